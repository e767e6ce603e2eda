"""Causal self-attention for bf16 training on the CPU: flash forward, float32 flash backward for short rows.

torch's CPU flash-attention backward is much slower in bf16 than in float32 at the widths fine-tuning batches
have (rows of tens to a few hundred tokens), casts included; on longer rows bf16 catches up (measured with
SmolLM2's 9 query / 3 key-value heads: bench/RESULTS.md). The forward is not affected.
:class:`CausalAttention` therefore runs torch's flash forward in the activation dtype, exactly as
``scaled_dot_product_attention`` does (same kernel, same output, and only the output plus one float32
log-sum-exp per query kept for backward), and for rows up to :data:`FLOAT32_BACKWARD_WIDTH` tokens runs torch's
flash backward kernel on float32 copies of ``q``, ``k``, ``v``, the output and its gradient, rounding the
gradients to bf16 once at the end. That is also a little more precise than the bf16 backward, which rounds
inside (tests/test_attention.py compares both with a float64 reference).

Used for packed training batches (packing.py). Anything else -- other devices and dtypes, calls without
gradients, longer rows, attention dropout -- is plain ``scaled_dot_product_attention``.

Padded batches (evaluation; training when packing is off) go through :func:`sdpa_attention`: transformers' SDPA,
except on the attention modules :func:`set_grouped_kv` marked, where a padded batch keeps its grouped key/value
heads (``enable_gqa``) instead of copying ``k`` and ``v`` to every query head (autograd would keep the copies).
transformers does this only without a mask; torch's CPU flash attention takes a mask and grouped heads together.
The switch is a flag on the model's own attention modules (fastpath.py sets and clears it), not process-wide.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "CausalAttention",
    "causal_attention",
    "usable",
    "FLOAT32_BACKWARD_WIDTH",
    "sdpa_attention",
    "set_grouped_kv",
    "GROUPED_KV",
]

FLOAT32_BACKWARD_WIDTH = 512  # below the measured crossover to bf16 (bench/RESULTS.md)

_ops = torch.ops.aten
_flash = getattr(_ops, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(_ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :class:`CausalAttention` applies: bf16 on the CPU, gradients needed, rows short enough to gain."""
    return (
        _flash is not None
        and _flash_backward is not None
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.dim() == 4
        and q.shape[1] % k.shape[1] == 0
        and q.shape[2] == k.shape[2] <= FLOAT32_BACKWARD_WIDTH
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention of ``q`` (B, H, W, d) over ``k``, ``v`` (B, Hkv, W, d); ``H`` a multiple of ``Hkv``.

    Attention dropout (``dropout > 0``) always takes ``scaled_dot_product_attention``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not dropout and usable(q, k, v):
        return CausalAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


class CausalAttention(torch.autograd.Function):
    """torch's flash forward in the input dtype; its flash backward in float32 (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _flash(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        f = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
        grads = _flash_backward(
            d_out.to(f), q.to(f), k.to(f), v.to(f), out.to(f), lse, 0.0, True, scale=ctx.scale
        )
        return *(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), None


# ------------------------------------------------------------------------------- padded batches: grouped k/v

GROUPED_KV = "llama_lora_grouped_kv"  # the flag set_grouped_kv puts on attention modules


def set_grouped_kv(model: torch.nn.Module, on: bool) -> int:
    """Mark (``on``) or unmark every attention module of ``model`` with grouped k/v heads (``num_key_value_groups``
    > 1) for :func:`sdpa_attention`. Returns how many. Takes effect where the model's attention implementation
    is llama-lora's (row_attention.enable)."""
    count = 0
    for module in model.modules():
        if getattr(module, "num_key_value_groups", 1) > 1:
            if on:
                setattr(module, GROUPED_KV, True)
            elif GROUPED_KV in module.__dict__:
                delattr(module, GROUPED_KV)
            else:
                continue
            count += 1
    return count


def sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' SDPA attention function; with a padding mask on a :func:`set_grouped_kv` module, the same
    SDPA call with the grouped heads (what transformers' own force-GQA environment switch does)."""
    plain = (
        attention_mask is None
        or not getattr(module, GROUPED_KV, False)
        or any(kwargs.get(k) for k in ("position_bias", "softcap", "output_attentions"))
    )
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # with a mask transformers passes is_causal=False (the mask is causal) and crops nothing
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=False,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None
