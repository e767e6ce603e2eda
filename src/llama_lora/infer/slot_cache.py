"""The engine's key/value cache: per layer, keys and values of shape (slots, kv heads, capacity, head dim), one
slot per live sequence, each row written at its own position (engine.py says how the slots are used).

It speaks transformers' `Cache.update` for a decode step, so transformers' own forward can run on it; the bf16
decoder (decode.py) writes the same tensors directly.
"""

from __future__ import annotations

import torch

__all__ = ["SlotCache"]


class SlotCache:
    """Keys and values for up to `slots` sequences, written at each row's own position (see module doc)."""

    is_compileable = False

    def __init__(self, config, slots: int, dtype: torch.dtype, device, capacity: int = 256):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_key_value_heads or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.shape = (text.num_hidden_layers, slots, heads, capacity, head_dim)
        self.keys = torch.zeros(self.shape, dtype=dtype, device=device)
        self.values = torch.zeros(self.shape, dtype=dtype, device=device)
        self.rows = 0  # live rows in this step
        self.width = 0  # positions this step reads
        self.positions: torch.Tensor | None = None  # (rows,) where each row's new token goes

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def ensure(self, needed: int) -> None:
        """Room for `needed` positions in every slot (doubling the capacity, contents kept)."""
        if needed <= self.capacity:
            return
        grown = self.capacity
        while grown < needed:
            grown *= 2
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], grown, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def store(self, slot: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A prefilled sequence's keys and values (per layer, (1, heads, length, dim)) into `slot`."""
        for layer, (k, v) in enumerate(layers_kv):
            self.keys[layer, slot, :, : k.shape[2]] = k[0]
            self.values[layer, slot, :, : v.shape[2]] = v[0]

    def move(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]

    def begin(self, positions: torch.Tensor, width: int) -> None:
        self.rows, self.positions, self.width = positions.shape[0], positions, width

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """transformers' Cache.update for a decode step: each row's one new key/value at its position."""
        rows = torch.arange(self.rows, device=key_states.device)
        self.keys[layer_idx, rows, :, self.positions] = key_states[:, :, 0]
        self.values[layer_idx, rows, :, self.positions] = value_states[:, :, 0]
        return (
            self.keys[layer_idx, : self.rows, :, : self.width],
            self.values[layer_idx, : self.rows, :, : self.width],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width
