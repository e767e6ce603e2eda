"""CPU training attention: flash forward with a float32 flash backward gives SDPA's output and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from llama_lora.kernels import attention, packing, row_attention
from llama_lora.train.objectives.sft import ResponseLoss
from tests.conftest import tiny_llama
from tests.kernels.test_packing import _examples


def _qkv(batch, heads, kv_heads, width, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, width, dim, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, width, dim, generator=g) * 1.5
    v = torch.randn(batch, kv_heads, width, dim, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _grads(fn, q, k, v, d_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(d_out)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.125, enable_gqa=k.shape[1] != q.shape[1]
    )


@pytest.mark.parametrize("kv_heads", [6, 2])
def test_matches_sdpa_in_float64(kv_heads: int) -> None:
    q, k, v = _qkv(2, 6, kv_heads, 37, 16, torch.float64)
    d_out = torch.randn(2, 6, 37, 16, dtype=torch.float64)
    ref_out, ref = _grads(_sdpa, q, k, v, d_out)
    out, got = _grads(lambda *t: attention.CausalAttention.apply(*t, 0.125), q, k, v, d_out)
    assert (out - ref_out).abs().max() < 1e-12
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("width", [5, 53, 146])
def test_bf16_same_output_as_sdpa_and_gradients_at_least_as_close(width: int) -> None:
    q, k, v = _qkv(3, 9, 3, width, 64, torch.bfloat16)
    d_out = torch.randn(3, 9, width, 64).bfloat16()
    assert attention.usable(q, k, v)
    _, exact = _grads(_sdpa, *[t.detach().double().requires_grad_() for t in (q, k, v)], d_out.double())
    sdpa_out, sdpa = _grads(_sdpa, q, k, v, d_out)
    out, got = _grads(lambda *t: attention.causal_attention(*t, scale=0.125), q, k, v, d_out)
    assert torch.equal(out, sdpa_out)  # the same flash forward kernel
    for a, b, ref in zip(got, sdpa, exact):
        assert a.dtype == torch.bfloat16
        err_ours = (a.double() - ref).norm() / ref.norm()
        err_sdpa = (b.double() - ref).norm() / ref.norm()
        assert err_ours < 5e-3 and err_ours <= 1.05 * err_sdpa, (err_ours, err_sdpa)


def test_applies_only_where_measured() -> None:
    q, k, v = _qkv(1, 4, 2, 8, 16, torch.bfloat16)
    assert attention.usable(q, k, v)
    with torch.no_grad():
        assert not attention.usable(q, k, v)
    assert not attention.usable(*_qkv(1, 4, 2, 8, 16, torch.float32))
    wide = _qkv(1, 4, 2, attention.FLOAT32_BACKWARD_WIDTH + 1, 16, torch.bfloat16)
    assert not attention.usable(*wide)
    frozen = [t.detach() for t in (q, k, v)]
    assert not attention.usable(*frozen)
    # where it does not apply, the result is SDPA's
    out = attention.causal_attention(*wide, scale=0.125)
    assert torch.equal(out, _sdpa(*wide))
    # attention dropout, even where it would apply, is SDPA's with dropout (same draws from the same seed)
    torch.manual_seed(3)
    dropped = attention.causal_attention(q, k, v, scale=0.125, dropout=0.5)
    torch.manual_seed(3)
    expected = F.scaled_dot_product_attention(
        q, k, v, dropout_p=0.5, is_causal=True, scale=0.125, enable_gqa=True
    )
    assert torch.equal(dropped, expected) and not torch.equal(dropped, _sdpa(q, k, v))


def test_packed_bf16_training_uses_it_and_matches_sdpa_gradients(monkeypatch) -> None:
    exs = _examples()
    model = tiny_llama().to(torch.bfloat16)
    row_attention.enable(model)
    batch = packing.collate_packed(exs)
    calls = []
    real = attention.CausalAttention.apply
    monkeypatch.setattr(
        attention.CausalAttention, "apply", lambda *a: (calls.append(a[0].shape), real(*a))[1]
    )

    def run():
        model.zero_grad()
        loss, n = ResponseLoss(model).train()(**batch)
        (loss / n).backward()
        return loss.detach().float(), {k: p.grad.float() for k, p in model.named_parameters()}

    loss, got = run()
    assert len(calls) == 2 and calls[0][0] == 4  # both layers, 4 rows
    monkeypatch.setattr(attention, "FLOAT32_BACKWARD_WIDTH", 0)  # now SDPA's bf16 backward
    ref_loss, ref = run()
    assert len(calls) == 2
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert (got[name] - ref[name]).norm() <= 2e-2 * ref[name].norm(), name
