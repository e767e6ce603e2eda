"""The fast DoRA variant against PEFT's own DoRA: outputs, gradients, dropout formula, merging, saving, autocast."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.variants import DoraEmbeddingVariant, DoraLinearVariant
from torch import nn
from transformers.pytorch_utils import Conv1D

from llama_lora.config import SEED_TARGETS
from llama_lora.kernels import fused
from llama_lora.model.adapters import keep_input_dtype
from llama_lora.model.fast_dora import (
    FastDoraLinearVariant,
    _invalidate,
    _linear_dora_layers,
    enable_fast_dora,
)
from tests.conftest import tiny_llama

LLAMA_TARGETS = SEED_TARGETS


def disable_fast_dora(model: nn.Module) -> int:
    """Restore PEFT's ``DoraLinearVariant`` wherever ``enable_fast_dora`` put the fast one (the reference the
    tests compare the fast variant with).

    Returns the number of layers restored.
    """
    count = 0
    for module in _linear_dora_layers(model):
        restored = False
        for name, variant in list(module.lora_variant.items()):
            if isinstance(variant, FastDoraLinearVariant):
                module.lora_variant[name] = DoraLinearVariant()
                restored = True
        if restored:
            _invalidate(module)
        count += restored
    return count


class Toy(nn.Module):
    """Linear layers with and without bias (optionally GPT-2 style Conv1D, i.e. fan_in_fan_out)."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        if conv1d:  # Conv1D(nf=out, nx=in), always with bias
            self.up, self.down, self.head = Conv1D(48, 24), Conv1D(24, 48), Conv1D(8, 24)
        else:
            self.up, self.down = nn.Linear(24, 48, bias=True), nn.Linear(48, 24, bias=False)
            self.head = nn.Linear(24, 8, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def _dora(model: nn.Module, targets: list[str], dropout: float = 0.0, **kw) -> PeftModel:
    config = LoraConfig(
        use_dora=True,
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=False,
        **kw,
    )
    peft_model = get_peft_model(model, config)
    # init_lora_weights=False gives B != 0; also move the magnitudes off the initial norms so m/||W'|| != 1.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return peft_model


def _toy(dropout: float = 0.0, conv1d: bool = False) -> PeftModel:
    torch.manual_seed(0)
    return _dora(Toy(conv1d), ["up", "down", "head"], dropout, fan_in_fan_out=conv1d)


def _llama(dropout: float = 0.0) -> PeftModel:
    base = tiny_llama()
    torch.manual_seed(1)
    return _dora(base, LLAMA_TARGETS, dropout)


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert any("lora_magnitude_vector" in n for n in grads)
    return grads


def _fwd_bwd(model: nn.Module, fast: bool, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    (enable_fast_dora if fast else disable_fast_dora)(model)
    model.zero_grad(set_to_none=True)
    out = run(model)
    out.float().pow(2).mean().backward()
    return out.detach(), _lora_grads(model)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    # atol is rtol times the tensor's own scale: it only absorbs entries that are ~0 compared with the rest. Float32
    # gradients through a network carry rounding noise of that size (PEFT's own float32 gradients of the tiny Llama
    # differ from a float64 run by up to ~1e-5 of their scale), so no reordering of the arithmetic can do better.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _assert_same(model: nn.Module, run, rtol: float = 1e-5) -> None:
    out_peft, grads_peft = _fwd_bwd(model, False, run)
    out_fast, grads_fast = _fwd_bwd(model, True, run)
    _close(out_fast, out_peft, rtol)
    assert grads_fast.keys() == grads_peft.keys()
    for name in grads_peft:
        _close(grads_fast[name], grads_peft[name], rtol)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_linear_layers_match_peft(train: bool, conv1d: bool) -> None:
    model = _toy(conv1d=conv1d).train(train)
    x = torch.randn(3, 5, 24)
    _assert_same(model, lambda m: m(x))


def test_two_active_adapters_match_peft() -> None:
    # The second adapter sees a `result` that already holds the first one's output, as in PEFT.
    model = _toy()
    model.add_adapter(
        "other",
        LoraConfig(
            use_dora=True, r=2, lora_alpha=4, target_modules=["up", "down", "head"], init_lora_weights=False
        ),
    )
    model.base_model.set_adapter(["default", "other"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    x = torch.randn(4, 24)
    _assert_same(model.train(), lambda m: m(x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_tiny_llama_matches_peft(train: bool) -> None:
    model = _llama().train(train)
    ids = torch.randint(0, 256, (2, 12))
    _assert_same(model, lambda m: m(input_ids=ids).logits)


def test_tiny_llama_float64_matches_peft_to_rounding() -> None:
    # Without float32 noise the norm identity and the rearranged output must agree with PEFT almost exactly.
    model = _llama().double().train()
    ids = torch.randint(0, 256, (2, 12))
    _assert_same(model, lambda m: m(input_ids=ids).logits, rtol=1e-9)


def test_enable_is_idempotent_and_leaves_embedding_alone() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.Linear(16, 4, bias=False))
    model = _dora(base, ["0", "1", "2"])
    assert enable_fast_dora(model) == 2
    assert enable_fast_dora(model) == 2
    assert type(model.base_model.model[0].lora_variant["default"]) is DoraEmbeddingVariant
    assert type(model.base_model.model[1].lora_variant["default"]) is FastDoraLinearVariant
    assert disable_fast_dora(model) == 2
    assert disable_fast_dora(model) == 0
    assert type(model.base_model.model[2].lora_variant["default"]) is DoraLinearVariant


def test_dropout_train_follows_documented_formula_and_eval_matches_peft() -> None:
    torch.manual_seed(0)
    p = 0.3
    model = _dora(nn.Sequential(nn.Linear(24, 40)), ["0"], dropout=p)
    layer = model.base_model.model[0]
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]
    x = torch.randn(6, 24)

    enable_fast_dora(model)
    model.train()
    torch.manual_seed(123)
    out = model(x)
    out.pow(2).mean().backward()
    got = {"A": A.grad.clone(), "B": B.grad.clone(), "m": m.grad.clone()}
    model.zero_grad(set_to_none=True)

    # Module docstring: out = g * (W x + s B A drop(x)) + bias, g = m / ||W + s B A||_row (a constant); the
    # same dropout mask as the layer's, since dropout is the first random draw after seeding.
    torch.manual_seed(123)
    x_drop = F.dropout(x, p, training=True)
    g = m / torch.linalg.norm(W + s * B @ A, dim=1).detach()
    expected = g * (x @ W.T + s * (x_drop @ A.T) @ B.T) + bias
    expected.pow(2).mean().backward()
    _close(out.detach(), expected.detach())
    for key, param in (("A", A), ("B", B), ("m", m)):
        _close(got[key], param.grad)
    model.zero_grad(set_to_none=True)

    # PEFT runs its base term on drop(x) too, so in training the two differ ...
    disable_fast_dora(model)
    torch.manual_seed(123)
    assert not torch.allclose(model(x), out, rtol=1e-3, atol=1e-3)
    # ... while in eval mode dropout is off and they agree.
    model.eval()
    _assert_same(model, lambda mm: mm(x))


def test_merge_and_unmerge_keep_fast_forward_correct() -> None:
    model = _toy().eval()
    enable_fast_dora(model)
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = model(x)

        merged = copy.deepcopy(model).merge_and_unload()
        _close(merged(x), before)

        model.merge_adapter()
        _close(model(x), before)  # merged: the base layers carry the adapter
        model.unmerge_adapter()
        assert all(
            type(v) is FastDoraLinearVariant
            for mod in model.modules()
            for v in getattr(mod, "lora_variant", {}).values()
        )
        _close(model(x), before)

        # The base weight changing under the cache (in place, or swapped like PEFT's merge does) must be seen.
        up = model.base_model.model.up.base_layer
        up.weight.mul_(1.5)
        fast = model(x)
        disable_fast_dora(model)
        _close(fast, model(x))
        enable_fast_dora(model)
        up.weight.data = up.weight.data * 0.5
        fast = model(x)
        disable_fast_dora(model)
        _close(fast, model(x))


def test_saved_adapter_loads_in_vanilla_peft(tmp_path) -> None:
    model = _llama(dropout=0.1)
    assert enable_fast_dora(model) == 2 * len(LLAMA_TARGETS)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(tmp_path))

    ids = torch.randint(0, 256, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    variants = [v for mod in loaded.modules() for v in getattr(mod, "lora_variant", {}).values()]
    assert len(variants) == 2 * len(LLAMA_TARGETS)
    assert all(type(v) is DoraLinearVariant for v in variants)
    with torch.no_grad():
        _close(loaded(input_ids=ids).logits, expected)
        _close(loaded.merge_and_unload()(input_ids=ids).logits, expected)


def _rel_err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return ((actual.float() - truth.float()).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("storage", ["fp32-base", "bf16-base"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpu_bf16_autocast_as_close_to_float32_as_peft(train: bool, storage: str) -> None:
    """Under bf16 autocast (fp32 base, or a bf16-stored base with bf16 adapter inputs, as training runs) the
    fast forward's outputs and gradients are typically as close to the float32 result as PEFT's bf16 path is:
    over several input batches, the median of (our largest error / PEFT's) is at most 1.5. One batch's ratio
    scatters with the input ids (0.6x-2.3x for the outputs on a CPU without bf16 instructions), so a single
    batch cannot carry the claim."""
    model = _llama().train(train)
    with torch.no_grad():  # the same base weights in both storages: round them to bf16 values first
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.copy_(p.bfloat16().float())
    batches = [torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(7)]

    def exact(ids: torch.Tensor):
        return lambda m: m(input_ids=ids).logits

    def bf16(ids: torch.Tensor):
        def run(m: nn.Module) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(input_ids=ids).logits

        return run

    truths = [_fwd_bwd(model, False, exact(ids)) for ids in batches]
    if storage == "bf16-base":
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.bfloat16()
        keep_input_dtype(model)

    def errors(out, grads, truth) -> tuple[float, float]:
        out_true, grads_true = truth
        return _rel_err(out, out_true), max(_rel_err(grads[n], grads_true[n]) for n in grads_true)

    ratios: dict[str, list[tuple[float, float]]] = {}
    for ids, truth in zip(batches, truths):
        out_peft, grads_peft = _fwd_bwd(model, False, bf16(ids))
        peft_out, peft_grad = errors(out_peft, grads_peft, truth)
        assert peft_grad > 1e-3  # bf16 really was in play: the test could fail
        runs = {"fast": _fwd_bwd(model, True, bf16(ids))}
        if train:  # the fused layers (train.fused) apply in training only
            assert fused.install(model) == 2 * len(LLAMA_TARGETS)
            runs["fused"] = _fwd_bwd(model, True, bf16(ids))
            fused.uninstall(model)
        for name, (out_fast, grads_fast) in runs.items():
            assert out_fast.dtype == out_peft.dtype == torch.bfloat16
            fast_out, fast_grad = errors(out_fast, grads_fast, truth)
            # floors as before: errors this small pass whatever PEFT's are
            ratio = (fast_out / max(peft_out, 1e-2 / 1.5), fast_grad / max(peft_grad, 2e-2 / 1.5))
            ratios.setdefault(name, []).append(ratio)
    for name, pairs in ratios.items():
        assert statistics.median(r for r, _ in pairs) <= 1.5, (name, "outputs", pairs)
        assert statistics.median(r for _, r in pairs) <= 1.5, (name, "gradients", pairs)
