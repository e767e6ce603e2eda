"""Fused training layers (fused.py, fused_blocks.py) against PEFT's and transformers' own forward/backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from llama_lora.config import SEED_TARGETS
from llama_lora.kernels import attention, fused, fused_blocks, row_attention
from llama_lora.model.fast_dora import enable_fast_dora
from tests.conftest import tiny_llama

TARGETS = SEED_TARGETS


class Toy(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(24, 40, bias=bias), nn.Linear(24, 8, bias=bias)

    def forward(self, x):
        return self.a(x).tanh().sum(-1, keepdim=True) * self.b(x)


def _adapt(model: nn.Module, targets, dora: bool, dropout: float = 0.0):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=targets,
        use_dora=dora,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # magnitudes away from the initial norms, so that g != 1
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    if dora:
        enable_fast_dora(peft_model)
    return peft_model


def _pair(make, dora: bool, dropout: float = 0.0):
    """Two identical adapted models: PEFT's forward, and the same with the fused layers installed."""
    torch.manual_seed(0)
    base = make()
    ref = _adapt(copy.deepcopy(base), _targets(base), dora, dropout)
    fast = copy.deepcopy(ref)
    assert fused.install(fast) > 0
    return ref.train(), fast.train()


def _targets(model: nn.Module):
    return TARGETS if isinstance(model, LlamaForCausalLM) else ["a", "b"]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_peft_without_dropout(dora: bool, bias: bool) -> None:
    ref, fast = _pair(lambda: Toy(bias), dora)
    x = torch.randn(3, 5, 24)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fast(xf)
    assert "FusedLoraLinear" in type(fast.base_model.model.a(xf).grad_fn).__name__
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    assert _rel(yf, yr) < 1e-5
    assert _rel(xf.grad, xr.grad) < 1e-5
    gr, gf = _grads(ref), _grads(fast)
    assert gr.keys() == gf.keys() and any("magnitude" in n for n in gr) == dora
    for name in gr:
        assert _rel(gf[name], gr[name]) < 1e-5, name


@pytest.mark.parametrize("dora", [False, True])
def test_tiny_llama_loss_and_grads_match_peft(dora: bool) -> None:
    ref, fast = _pair(tiny_llama, dora)
    ids = torch.randint(0, 256, (2, 12))
    lr = ref(input_ids=ids, labels=ids).loss
    lf = fast(input_ids=ids, labels=ids).loss
    lr.backward()
    lf.backward()
    assert abs(lf.item() - lr.item()) < 1e-5 * abs(lr.item())
    gr, gf = _grads(ref), _grads(fast)
    assert len(gr) == len(gf) == (3 if dora else 2) * len(TARGETS) * 2
    for name in gr:
        assert _rel(gf[name], gr[name]) < 1e-4, name


def test_eval_no_grad_and_peft_dora_take_peft_path() -> None:
    ref, fast = _pair(lambda: Toy(False), True)
    layer = fast.base_model.model.a
    x = torch.randn(4, 24, requires_grad=True)
    assert "FusedLoraLinear" in type(layer(x).grad_fn).__name__
    fast.eval()
    assert "FusedLoraLinear" not in type(layer(x).grad_fn).__name__
    fast.train()
    with torch.no_grad():
        assert layer(x).grad_fn is None
    from peft.tuners.lora.variants import DoraLinearVariant

    layer.lora_variant["default"] = DoraLinearVariant()  # peft.fast_dora: false keeps PEFT's own DoRA
    assert "FusedLoraLinear" not in type(layer(x).grad_fn).__name__
    assert fused.uninstall(fast) == 2 and not fused.installed(layer)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_drop_positions_are_an_independent_bernoulli_process(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_000
    pos = fused.drop_positions(n, p, "cpu")
    assert pos.dtype == torch.int64 and pos.numel() == pos.unique().numel()
    assert int(pos.min()) >= 0 and int(pos.max()) < n and bool((pos[1:] > pos[:-1]).all())
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    # neighbours (also across the chunk of draws) are independent: P(both dropped) = p^2
    both = (dropped[1:] & dropped[:-1]).double().mean().item()
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5
    # the same on a small tensor, where several chunks of draws may be needed, and at the edges
    assert fused.drop_positions(0, p, "cpu").numel() == 0
    assert fused.drop_positions(7, 0.0, "cpu").numel() == 0
    assert torch.equal(fused.drop_positions(5, 1.0, "cpu"), torch.arange(5))
    counts = torch.zeros(10)
    for _ in range(4000):
        counts[fused.drop_positions(10, p, "cpu")] += 1
    assert (counts / 4000 - p).abs().max().item() < 5 * (p * (1 - p) / 4000) ** 0.5


def test_zeroed_sets_exactly_those_positions() -> None:
    pos = torch.tensor([0, 5, 11], dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(3, 4).to(dtype) + 5
        expected = x.clone().view(-1)
        expected[pos.long()] = 0
        y = fused._zeroed(x, pos)
        assert torch.equal(y, expected.view(3, 4)) and not torch.equal(x, y)
        assert fused._zeroed(x, None) is x
        assert fused._zeroed(x, pos, inplace=True) is x and torch.equal(x, y)


def test_same_seed_same_masks_and_dropout_matches_formula() -> None:
    """With dropout: out = W x + s * B A (x * k / P(keep)) + bias, for the mask keep_mask draws at that point."""
    torch.manual_seed(0)
    p = 0.3
    _, fast = _pair(lambda: Toy(True), False, dropout=p)
    layer = fast.base_model.model.a
    x = torch.randn(6, 24)
    torch.manual_seed(7)
    y1 = layer(x.clone().requires_grad_())
    torch.manual_seed(7)
    y2 = layer(x.clone().requires_grad_())
    assert torch.equal(y1, y2)
    torch.manual_seed(7)
    keep = torch.ones(6 * 24)
    keep[fused.drop_positions(6 * 24, p, "cpu")] = 0
    keep = keep.view(6, 24)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.get_base_layer()
    dropped = x * keep / (1 - p)
    expected = base(x) + layer.scaling["default"] * dropped @ a.T @ b.T
    assert _rel(y1, expected) < 1e-6
    assert 0 < (keep == 0).sum() < keep.numel()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradcheck_float64(dora: bool, dropout: float) -> None:
    """Analytical gradients of the fused node (x, A, B, m; with a fixed dropout mask) against finite differences."""
    torch.manual_seed(0)
    out_f, in_f, r = 7, 5, 3
    weight, bias = torch.randn(out_f, in_f, dtype=torch.float64), torch.randn(out_f, dtype=torch.float64)
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(out_f, dtype=torch.float64) + 0.5).requires_grad_(dora)
    norm = torch.rand(out_f, dtype=torch.float64) + 0.5

    def f(x, a, b, m):
        torch.manual_seed(3)  # the same mask on every call
        return fused.FusedLoraLinear.apply(
            x, weight, bias, a, b, m if dora else None, norm if dora else None, 1.7, dropout, torch.float64
        )

    assert torch.autograd.gradcheck(f, (x, a, b, m))


def _tiny_model(dora: bool, dropout: float, blocks: bool):
    torch.manual_seed(0)
    model = _adapt(tiny_llama(), TARGETS, dora, dropout)
    fused.install(model)
    if blocks:
        assert fused_blocks.install(model) == {"rms_norm": 5, "swiglu": 2}
    return model.train()


def test_blocks_match_transformers_bitwise_forward_and_close_backward() -> None:
    torch.manual_seed(0)
    ref = tiny_llama().to(torch.bfloat16).train()
    for p in ref.parameters():
        p.requires_grad_(False)
    fast = copy.deepcopy(ref)
    fused_blocks.install(fast)
    ids = torch.randint(0, 256, (2, 10))
    hr = ref.model.embed_tokens(ids).requires_grad_()
    hf = hr.detach().clone().requires_grad_()
    yr = ref.model.layers[0].mlp(ref.model.layers[0].input_layernorm(hr))
    yf = fast.model.layers[0].mlp(fast.model.layers[0].input_layernorm(hf))
    assert torch.equal(yr, yf)
    g = torch.randn_like(yr)
    yr.backward(g)
    yf.backward(g)
    assert _rel(hf.grad.float(), hr.grad.float()) < 2e-2  # bf16 rounding of different operation orders
    assert fused_blocks.uninstall(fast) == 5 + 2


def test_blocks_gradcheck_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fused_blocks.RMSNormFn.apply(x, w, 1e-5), (x,))
    gate = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused_blocks.SwiGLUFn.apply, (gate, up))


def test_gradient_checkpointing_recomputes_the_same_masks() -> None:
    ids = torch.randint(0, 256, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = _tiny_model(True, 0.2, blocks=True)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def _saved_bytes(model, ids) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


def test_fused_layers_keep_much_less_for_backward() -> None:
    ids = torch.randint(0, 256, (4, 64))
    torch.manual_seed(0)
    plain = _adapt(tiny_llama().to(torch.bfloat16), TARGETS, True, 0.05).train()
    fast = _tiny_model(True, 0.05, blocks=True).to(torch.bfloat16)
    for model in (plain, fast):
        for p in model.parameters():  # adapter weights stay float32, as in training
            if p.requires_grad:
                p.data = p.data.float()
    before, after = _saved_bytes(plain, ids), _saved_bytes(fast, ids)
    assert after < 0.6 * before, (before, after)


def test_grouped_kv_attention_with_padding_mask_matches_repeated_heads() -> None:
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: transformers passes a mask to SDPA
    plain = model(input_ids=ids, attention_mask=mask).logits
    assert attention.set_grouped_kv(model, True) == 2  # both layers' attention, on this model only
    row_attention.enable(model)
    assert getattr(model.model.layers[0].self_attn, attention.GROUPED_KV)
    grouped = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(grouped[valid].float(), plain[valid].float(), atol=2e-2, rtol=2e-2)
