"""Packed (padding-free) training batches give the padded batches' loss and gradients."""

from __future__ import annotations

import torch

from llama_lora.data.batching import collate
from llama_lora.data.encoding import IGNORE, Example
from llama_lora.kernels import fused, fused_blocks, packing, row_attention
from llama_lora.train.objectives.sft import ResponseLoss
from tests.conftest import tiny_llama


def _examples() -> list[Example]:
    torch.manual_seed(1)
    out = []
    for n in (7, 12, 3, 9):
        ids = torch.randint(0, 256, (n,)).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE] * (n // 2) + ids[n // 2 :]))
    return out


def test_collate_packed_layout() -> None:
    exs = _examples()
    b = packing.collate_packed(exs)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, 31)
    assert b["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    rows = b["llama_lora_rows"]
    assert (rows.rows, rows.width) == (4, 12)
    assert rows.slots[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 13]
    # each row's first label is ignored, so no row predicts the next row's first token
    starts = [0, 7, 19, 22]
    assert all(b["labels"][0, s].item() == IGNORE for s in starts)
    assert b["input_ids"][0, 7:19].tolist() == exs[1].input_ids


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = ResponseLoss(model).train()(**batch)
    loss.backward()
    return (
        loss.detach(),
        int(n),
        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
    )


def test_packed_batch_matches_padded_batch_with_fused_adapters() -> None:
    from peft import LoraConfig, get_peft_model

    exs = _examples()
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    )
    with torch.no_grad():  # non-zero B, so that every gradient is non-trivial
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fused.install(peft_model)
    fused_blocks.install(peft_model)
    ref_loss, ref_n, ref = _loss_and_grads(peft_model, collate(exs, pad_id=0))
    assert row_attention.enable(model) == "sdpa"
    calls = []
    real = row_attention._to_rows
    row_attention._to_rows = lambda t, rows: (calls.append(rows.rows), real(t, rows))[1]
    try:
        loss, n, got = _loss_and_grads(peft_model, packing.collate_packed(exs))
    finally:
        row_attention._to_rows = real
    assert calls == [4] * 6  # q, k and v of both layers, per row
    assert n == ref_n and torch.allclose(loss, ref_loss, rtol=1e-6)
    assert set(got) == set(ref) and len(got) == 3 * 3 * 2
    for k in ref:
        assert (got[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k
    # calls without packed rows (evaluation, generation) take SDPA with transformers' mask
    padded = collate(exs, pad_id=0)
    peft_model.eval()
    with torch.no_grad():
        packed_impl = peft_model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]
        ).logits
        model.set_attn_implementation("sdpa")
        sdpa = peft_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert torch.equal(packed_impl, sdpa)


def test_single_row_pack_is_plain_causal_attention() -> None:
    exs = _examples()[:1]
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ref_loss, _, ref = _loss_and_grads(model, collate(exs, pad_id=0))
    row_attention.enable(model)
    loss, _, got = _loss_and_grads(model, packing.collate_packed(exs))
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for k in ref:
        assert (got[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k


def test_packed_batch_with_gradient_checkpointing() -> None:
    exs = _examples()
    model = tiny_llama()
    row_attention.enable(model)
    batch = packing.collate_packed(exs)
    ref_loss, _, ref = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, _, got = _loss_and_grads(model, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for k in ref:
        assert (got[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k


def test_packed_pairs_match_padded_pairs_in_dpo() -> None:
    """A preference batch packed (both answers of both pairs in one sequence) gives the padded batch's summed
    log-probs, counts, DPO loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model

    from llama_lora.data.pairs import PairExample
    from llama_lora.train.objectives.preference import PreferenceObjective

    exs = _examples()
    pairs = [PairExample(exs[0], exs[1], -30.0, -41.0), PairExample(exs[2], exs[3], -9.0, -25.0)]
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    padded_obj = PreferenceObjective(peft_model, "dpo", 0.1, 0.0, pad_id=0)
    packed_obj = PreferenceObjective(peft_model, "dpo", 0.1, 0.0, pad_id=0, packed=True)

    def run(obj):
        peft_model.zero_grad()
        batch = obj.collate(pairs)
        sums, counts = obj.module.logps(**{k: v for k, v in batch.items() if k != "ref_logps"})
        loss, n = obj.module.train()(**batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in peft_model.named_parameters() if p.grad is not None}
        return sums.detach(), counts, loss.detach(), n, grads

    want = run(padded_obj)
    row_attention.enable(model)
    got = run(packed_obj)
    assert "position_ids" in packed_obj.collate(pairs)
    assert torch.equal(got[1], want[1]) and got[1].tolist() == [4, 2, 6, 5]
    assert torch.allclose(got[0], want[0], rtol=1e-5) and torch.allclose(got[2], want[2], rtol=1e-5)
    assert got[3] == want[3] == 2
    assert set(got[4]) == set(want[4]) and len(want[4]) == 2 * 2 * 2
    for k in want[4]:
        assert (got[4][k] - want[4][k]).norm() <= 1e-5 * want[4][k].norm(), k
