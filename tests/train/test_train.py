"""End to end on the tiny model: artifacts, plain-PEFT reload, loss computed like the model's own."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from llama_lora.config import Config, load_config
from llama_lora.data.batching import collate
from llama_lora.data.encoding import IGNORE
from llama_lora.kernels import head
from llama_lora.train.build import make_optimizer
from llama_lora.train.loop import train
from llama_lora.train.objectives import sft
from tests.conftest import run_cli, run_in_process, tiny_overrides


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The response-token loss through the model's own forward (full logits): the oracle ours is checked against."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _probe_batch(tokenizer):
    ids = tokenizer("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_writes_artifacts_and_adapter_reloads_in_plain_peft(
    tmp_path, tiny_model_dir, alpaca_file, tokenizer, use_dora
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = load_config(
        overrides=tiny_overrides(
            tiny_model_dir,
            alpaca_file,
            out,
            **{"peft.use_dora": use_dora, "train.max_steps": 6, "train.save_steps": 3, "train.eval_steps": 2},
        )
    )
    result = train(cfg, quiet=True)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "train_summary.json",
        "loss.png",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "checkpoints/checkpoint-3/adapter/adapter_model.safetensors",
        "checkpoints/checkpoint-3/optimizer.safetensors",
    ):
        assert (out / name).is_file(), name
    assert load_config(out / "config.yaml") == cfg
    summary = json.loads((out / "train_summary.json").read_text())
    for key in (
        "train_loss",
        "eval_loss",
        "eval_loss_before",
        "runtime_s",
        "train_tokens",
        "tokens_per_second",
        "peak_memory_mb",
        "device",
        "precision",
        "model",
        "train_rows",
    ):
        assert summary[key] is not None, key
    assert summary["method"] == ("dora" if use_dora else "lora")
    assert summary["fused"] is True  # train.fused: auto turns the fused layers on for the CPU
    assert summary["eval_loss"] < summary["eval_loss_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all({"epoch", "learning_rate", "tokens_per_second"} <= set(r) for r in train_records)

    adapter_cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is use_dora and adapter_cfg["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    trained = result.model.eval()
    ids, mask = _probe_batch(tokenizer)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
        with reloaded.disable_adapter():
            untouched = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-4  # the adapter changes the model: the test could fail


def test_response_loss_matches_the_models_own_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from llama_lora.data.encoding import tokenize

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    examples = [
        tokenize([("Question one?", False), ("Answer" + tokenizer.eos_token, True)], tokenizer),
        tokenize([("Q2", False), ("A much longer answer here" + tokenizer.eos_token, True)], tokenizer),
    ]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours, n = sft.ResponseLoss(model)(**batch)
        theirs = reference_loss(model, batch)
    assert n == sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("frozen_head", [True, False], ids=["fused-frozen-head", "checkpointed-trained-head"])
def test_response_loss_gradients_match_the_full_logits_path(
    tiny_model_dir, tokenizer, monkeypatch, frozen_head
):
    """The chunked loss gives the same gradients as the plain full-logits loss, both through the fused
    linear-cross-entropy path (frozen head, as in adapter training) and the checkpointed one."""
    from transformers import AutoModelForCausalLM

    from llama_lora.data.encoding import tokenize

    monkeypatch.setattr(head, "CHUNK", 4)  # force several chunks
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.get_output_embeddings().weight.requires_grad_(not frozen_head)
    used = []
    monkeypatch.setattr(head.LinearCrossEntropy, "apply", _recording(head.LinearCrossEntropy.apply, used))
    examples = [
        tokenize([("Q", False), ("An answer of several tokens" + tokenizer.eos_token, True)], tokenizer)
    ]
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    ours, _ = sft.ResponseLoss(model)(**batch)
    ours.backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference_loss(model, batch).backward()
    theirs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mine.keys() == theirs.keys() and len(mine) > 5
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert bool(used) == frozen_head


@pytest.mark.parametrize("autocast", [False, True], ids=["float32-vocab-blocks", "bf16-autocast-one-linear"])
def test_head_chunk_log_probs_and_gradient_match_autograd(monkeypatch, autocast):
    """chunk_log_softmax's log-probs and cross-entropy gradient equal autograd's through F.cross_entropy, in
    both layouts: float32 on the CPU (vocab-row blocks, a partial last block) and one F.linear under autocast."""
    monkeypatch.setattr(head, "HEAD_BLOCK", 64)
    torch.manual_seed(0)
    weight, h = torch.randn(300, 32) * 0.3, torch.randn(7, 32)
    y = torch.randint(0, 300, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert head._head_logits(h, weight)[1] == (1 if autocast else 0)
        logp, d_h = head.chunk_log_softmax(h, weight, y, grad=True)
        h_ref = h.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h_ref, weight).float(), y, reduction="none"
        )
        ref.sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, -ref.detach(), **tol)
    torch.testing.assert_close(d_h.float(), h_ref.grad.float(), **tol)
    assert head.chunk_log_softmax(h, weight, y, grad=False)[1] is None


def _recording(fn, calls: list):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)

    return wrapper


def test_grad_accum_matches_one_big_batch(tmp_path, tiny_model_dir, alpaca_file):
    """Token-normalised accumulation: 2 micro-batches x accum 2 == 1 batch of 4 (same rows, same order)."""
    common = {
        "train.max_steps": 1,
        "train.max_batch_tokens": None,
        "peft.use_dora": False,
        "train.lr_scheduler": "constant",
        "train.warmup_ratio": 0.0,
        "data.eval_fraction": 0.0,
        "data.max_rows": 4,
    }
    big = train(
        load_config(
            overrides=tiny_overrides(
                tiny_model_dir, alpaca_file, tmp_path / "a", **common, **{"train.batch_size": 4}
            )
        ),
        quiet=True,
    )
    small = train(
        load_config(
            overrides=tiny_overrides(
                tiny_model_dir,
                alpaca_file,
                tmp_path / "b",
                **common,
                **{"train.batch_size": 2, "train.grad_accum": 2},
            )
        ),
        quiet=True,
    )
    from peft import get_peft_model_state_dict

    a, b = get_peft_model_state_dict(big.model), get_peft_model_state_dict(small.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_in_process("train", *tiny_overrides(tiny_model_dir, alpaca_file, out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_seed_preset_with_a_local_model_trains(tmp_path, tiny_model_dir, alpaca_file):
    """The seed's recipe (alpaca template, batch 1 x accum 8, checkpointing, DoRA) on a local Llama dir."""
    out = tmp_path / "seed-run"
    result = run_cli(
        "train",
        "--preset",
        "seed",
        "--quiet",
        f"model.name={tiny_model_dir}",
        f"data.source={alpaca_file}",
        "data.split=train",
        "train.max_steps=2",
        "train.precision=fp32",
        f"output.dir={out}",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["template"] == "alpaca" and summary["method"] == "dora"
    assert json.loads((out / "adapter/adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_pissa_and_olora_adapters_apply_to_the_original_base(
    tmp_path, tiny_model_dir, alpaca_file, tokenizer, init
):
    """PiSSA/OLoRA rewrite the base weights in memory; the saved adapter must still fit the original base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = load_config(
        overrides=tiny_overrides(
            tiny_model_dir, alpaca_file, out, **{"peft.use_dora": False, "peft.init_lora_weights": init}
        )
    )
    result = train(cfg, quiet=True)
    assert not (out / ".init").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids, mask = _probe_batch(tokenizer)
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_auto_optimizer_is_the_fused_adamw_where_torch_has_it_with_the_same_steps():
    cfg = Config().train
    assert cfg.optim == "auto"
    torch.manual_seed(0)
    start = [torch.randn(16, 48), torch.randn(48)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    finals = {}
    for optim in ("auto", "adamw_torch"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make_optimizer(params, cfg.model_copy(update={"optim": optim, "weight_decay": 0.01}))
        assert opt.defaults["fused"] is (True if optim == "auto" else None)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals[optim] = params
    for fused, plain, before in zip(finals["auto"], finals["adamw_torch"], start):
        assert not torch.equal(fused, before)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    # no fused kernel for complex parameters: auto falls back instead of failing at the first step
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    assert make_optimizer([complex_param], cfg).defaults["fused"] is None
