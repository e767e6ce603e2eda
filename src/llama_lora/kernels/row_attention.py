"""Attention for packed rows (packing.py) that never crosses a row boundary.

:func:`packed_attention` (registered with transformers' ``AttentionInterface`` as ``"llama_lora_packed"``)
scatters the packed queries, keys and values into the padded ``(B, H, max(l), d)`` layout, runs one causal
attention call (:func:`llama_lora.kernels.attention.causal_attention`: torch's flash attention, with its float32
backward for short bf16 rows on the CPU), and gathers the real positions back. With right padding a causal mask
is already exact for every real query (its keys are real tokens of its own row), so no padding mask is needed;
padded positions are never read back, so they receive no gradient.

Calls without ``llama_lora_rows`` (evaluation, generation) take transformers' SDPA path
(:func:`llama_lora.kernels.attention.sdpa_attention`: with grouped k/v heads where the fast path set that
switch). :func:`enable` routes a model's attention here and :func:`disable` puts back the implementation it had.
"""

from __future__ import annotations

from functools import partial

import torch

from llama_lora.kernels.attention import causal_attention, sdpa_attention
from llama_lora.kernels.packing import PackedRows

NAME = "llama_lora_packed"


def _to_rows(t: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """(1, heads, N, d) packed -> (rows, heads, width, d), zeros at padding."""
    packed = t[0].transpose(0, 1)  # (N, heads, d)
    padded = packed.new_zeros(rows.rows * rows.width, *packed.shape[1:])
    padded = padded.index_copy(0, rows.slots, packed)
    return padded.view(rows.rows, rows.width, *packed.shape[1:]).transpose(1, 2)


def packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention function: per-row causal attention for packed batches, SDPA otherwise."""
    rows: PackedRows | None = kwargs.pop("llama_lora_rows", None)
    if rows is None:
        return sdpa_attention(
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
    # CPU bf16 training: float32 flash backward for short rows; otherwise SDPA
    attend = partial(causal_attention, scale=scaling, dropout=dropout)
    if rows.rows == 1:
        return attend(query, key, value).transpose(1, 2).contiguous(), None
    out = attend(_to_rows(query, rows), _to_rows(key, rows), _to_rows(value, rows))  # (rows, heads, width, d)
    out = out.transpose(1, 2).reshape(rows.rows * rows.width, out.shape[1], out.shape[3])
    return out.index_select(0, rows.slots)[None], None  # (1, N, heads, d)


def register() -> None:
    """Make ``"llama_lora_packed"`` known to transformers (attention function and its mask builder)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


_PREVIOUS = "_llama_lora_attn_before_packing"  # on the model: the implementation disable() restores


def enable(model) -> str:
    """Route ``model``'s attention through :func:`packed_attention`; returns the implementation it had."""
    register()
    previous = model.config._attn_implementation
    if previous != NAME:
        model.__dict__[_PREVIOUS] = previous
    model.set_attn_implementation(NAME)
    return model.__dict__.get(_PREVIOUS, previous)


def disable(model) -> bool:
    """Undo :func:`enable`: ``model``'s attention implementation as it was before. False if it was not enabled."""
    previous = model.__dict__.pop(_PREVIOUS, None)
    if previous is None:
        return False
    model.set_attn_implementation(previous)
    return True
