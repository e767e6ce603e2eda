"""Padding-free training batches: the rows of a micro-batch packed into one sequence.

A padded micro-batch of rows with lengths ``l_1..l_B`` costs ``B * max(l)`` token positions in every projection,
norm and MLP, although only ``sum(l)`` carry data (still more even when batches are grouped by length, as the
benchmark's are; measured: bench/RESULTS.md). :func:`collate_packed` concatenates the rows into one ``(1, N)``
sequence with per-row ``position_ids`` (rotary positions restart at 0 for every row), so all of those operations
run on the ``N`` real tokens only, and records each token's slot in the padded layout (:class:`PackedRows`) for
the attention that keeps the rows apart (row_attention.py).

The loss is unchanged: the label of each row's first token is ignored (as it already was: targets are shifted
by one inside a row, and a row starts with prompt tokens), so the last token of one row never predicts the first
token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_lora.data.encoding import IGNORE, Example


@dataclass
class PackedRows:
    """Where the packed tokens sit in the padded ``(rows, width)`` layout: ``slots[i] = row * width + pos``."""

    slots: torch.Tensor  # (N,) int64
    rows: int
    width: int

    def to(self, device) -> PackedRows:
        return PackedRows(self.slots.to(device), self.rows, self.width)


def collate_packed(examples: list[Example]) -> dict:
    """One ``(1, N)`` sequence of the rows' tokens, per-row position ids, and the rows' slots for attention."""
    lengths = [len(e) for e in examples]
    width = max(lengths)
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)
    labels = torch.tensor([t for e in examples for t in e.labels], dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lengths])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[starts] = IGNORE  # never a target across a row boundary
    slots = torch.cat([row * width + torch.arange(n) for row, n in enumerate(lengths)])
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": positions[None],
        "llama_lora_rows": PackedRows(slots, len(lengths), width),
    }
