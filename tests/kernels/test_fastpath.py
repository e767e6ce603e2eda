"""The fast path as one object (fastpath.py): chosen from the config, installed, collated, and uninstalled to plain PEFT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from llama_lora.config import SEED_TARGETS, TrainConfig
from llama_lora.data.batching import collate
from llama_lora.kernels import attention, fused, packing, row_attention
from llama_lora.kernels.fastpath import FastPath
from tests.conftest import tiny_llama
from tests.kernels.test_fused import _adapt
from tests.kernels.test_packing import _examples

ALL = FastPath(fused=True, packing=True, grouped_kv=True)


@pytest.mark.parametrize(
    "fused_key, packing_key, device, expected",
    [
        ("auto", "auto", "cpu", (True, True, True)),
        ("auto", "auto", "cuda", (False, False, False)),
        (True, "auto", "cuda", (True, True, False)),
        ("auto", False, "cpu", (True, False, True)),
        (False, True, "cpu", (False, True, False)),  # packing works without the fused layers
        (False, "auto", "mps", (False, False, False)),
    ],
)
def test_choose_from_fused_and_packing_keys(fused_key, packing_key, device, expected) -> None:
    path = FastPath.choose(TrainConfig(fused=fused_key, packing=packing_key), device)
    assert (path.fused, path.packing, path.grouped_kv) == expected


def test_describe() -> None:
    assert ALL.describe() == "fused training layers, packed batches, grouped k/v heads"
    assert FastPath(False, True, False).describe() == "packed batches"
    assert FastPath(False, False, False).describe() == "PEFT's forward, padded batches"


def test_collate_packs_only_with_packing() -> None:
    rows = _examples()
    packed = ALL.collate(rows, pad_id=0)
    assert packed["input_ids"].shape == (1, sum(len(r) for r in rows)) and "llama_lora_rows" in packed
    padded = FastPath(True, False, True).collate(rows, pad_id=0)
    expected = collate(rows, 0)
    assert padded.keys() == expected.keys() and all(torch.equal(padded[k], expected[k]) for k in expected)


def _dora(dropout: float = 0.1):
    torch.manual_seed(0)
    model = _adapt(tiny_llama(), SEED_TARGETS, dora=True, dropout=dropout)
    with torch.no_grad():  # non-zero B: every gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _train_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout draws for every model
    model(**batch).loss.backward()
    out = model(**batch).logits.detach()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layout(model) -> list[tuple]:
    """Every module's name, type, own attributes (an instance `forward`, a flag) and the attention setting."""
    return [(n, type(m), sorted(m.__dict__)) for n, m in model.named_modules()] + [
        model.config._attn_implementation
    ]


def _padded_batch():
    batch = collate(_examples(), pad_id=0)
    batch["labels"] = batch["labels"].clone()
    return batch


def test_uninstall_gives_back_plain_peft_bitwise(tmp_path: Path) -> None:
    ref = _dora()
    model = copy.deepcopy(ref)
    ALL.install(model, model.get_base_model())
    layer = model.get_base_model().model.layers[0]
    assert fused.installed(layer.self_attn.q_proj)
    assert model.config._attn_implementation == row_attention.NAME
    assert getattr(layer.self_attn, attention.GROUPED_KV)
    _train_step(model, packing.collate_packed(_examples()))  # train a step on the fast path

    ALL.uninstall(model, model.get_base_model())
    with torch.no_grad():  # the same weights as ref again (the step above only filled .grad)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    batch = _padded_batch()
    ref_out, ref_grads = _train_step(ref, batch)
    out, grads = _train_step(model, batch)
    assert _layout(model) == _layout(ref)
    assert torch.equal(out, ref_out)  # PEFT's dropout and forward again: bitwise
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    ref.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref(**batch).logits)
    for name, m in (("ref", ref), ("model", model)):
        m.save_pretrained(tmp_path / name)
    weights = "adapter_model.safetensors"
    assert (tmp_path / "model" / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()
    configs = [json.loads((tmp_path / n / "adapter_config.json").read_text()) for n in ("model", "ref")]
    for c in configs:  # a set in PEFT: its order differs between two equal configs
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    ref_merged = copy.deepcopy(ref).merge_and_unload().state_dict()
    assert merged.keys() == ref_merged.keys() and all(torch.equal(merged[k], ref_merged[k]) for k in merged)


def test_install_uninstall_install_again_is_a_fresh_install() -> None:
    once, twice = _dora(), _dora()
    ALL.install(once, once.get_base_model())
    ALL.install(twice, twice.get_base_model())
    ALL.uninstall(twice, twice.get_base_model())
    ALL.uninstall(twice, twice.get_base_model())  # a second uninstall changes nothing
    ALL.install(twice, twice.get_base_model())
    assert _layout(twice) == _layout(once)
    batch = packing.collate_packed(_examples())
    out, grads = _train_step(once, batch)
    out2, grads2 = _train_step(twice, batch)
    assert torch.equal(out, out2) and all(torch.equal(grads[k], grads2[k]) for k in grads)


def test_uninstall_without_install_changes_nothing() -> None:
    ref = _dora()
    model = copy.deepcopy(ref)
    ALL.uninstall(model, model.get_base_model())
    assert _layout(model) == _layout(ref)


def test_packing_without_fused_layers_matches_padded_batches() -> None:
    model = _dora(dropout=0.0)
    path = FastPath(fused=False, packing=True, grouped_kv=False)
    ref_out, ref_grads = _train_step(model, _padded_batch())
    path.install(model, model.get_base_model())
    assert not fused.installed(model.get_base_model().model.layers[0].self_attn.q_proj)
    model.train()
    model.zero_grad()
    packed = path.collate(_examples(), pad_id=0)
    model(**packed).loss.backward()
    ref_loss = _dora(dropout=0.0)(**_padded_batch()).loss
    assert torch.allclose(model(**packed).loss, ref_loss, rtol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (p.grad - ref_grads[n]).norm() <= 1e-5 * ref_grads[n].norm(), n


def _sdpa_calls(monkeypatch) -> list[tuple[int, bool, bool]]:
    """(key heads, enable_gqa, a mask given) of every SDPA call, from now on."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((k.shape[1], bool(kw.get("enable_gqa")), attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_grouped_kv_is_per_model_and_bitwise_transformers_own_switch(monkeypatch) -> None:
    torch.manual_seed(0)
    base = tiny_llama().to(torch.bfloat16)
    plain, grouped = base, copy.deepcopy(base)
    FastPath(fused=False, packing=False, grouped_kv=True).install(grouped, grouped)
    batch = _padded_batch()
    del batch["labels"]
    calls = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        out = grouped(**batch).logits
        assert calls == [(2, True, True)] * 2  # 2 key/value heads, not copied to the 4 query heads
        calls.clear()
        plain_out = plain(**batch).logits  # another model in the same process: transformers' default
        assert calls == [(4, False, True)] * 2
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # what the fast path set before, process-wide
        assert torch.equal(out, plain(**batch).logits)
    assert torch.allclose(out.float(), plain_out.float(), atol=2e-2, rtol=2e-2)


def test_no_process_wide_switch_left() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "llama_lora"
    assert not [p.name for p in src.rglob("*.py") if "SDPA_FORCE_GQA" in p.read_text()]
    for name in ("fastpath", "attention", "packing", "row_attention", "fused", "fused_blocks"):
        assert "os.environ" not in (src / "kernels" / f"{name}.py").read_text(), name
