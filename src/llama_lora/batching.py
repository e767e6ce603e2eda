"""Batches by token budget, grouped by length, so no row is padded to max_length.

The seed padded every row to 1024 tokens; a typical Alpaca row is ~150. Here a micro-batch holds at most
`batch_size` rows and at most `max_batch_tokens` tokens counted as rows x longest row (what padding costs),
so memory is bounded by the budget whatever the row lengths are.
"""

from __future__ import annotations

import random

import torch

from llama_lora.data import IGNORE, Example


def plan_batches(
    lengths: list[int],
    batch_size: int,
    max_batch_tokens: int | None,
    seed: int,
    shuffle: bool = True,
    group: int = 64,
) -> list[list[int]]:
    """Indices grouped into micro-batches.

    Rows are shuffled, then taken `group * batch_size` at a time, sorted by length inside each such window
    and cut into batches that respect both limits; the order of the batches is shuffled again. A row longer
    than the budget gets a batch of its own. Deterministic for a given seed.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    window = max(1, group * batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        current: list[int] = []
        longest = 0
        for i in chunk:
            new_longest = max(longest, lengths[i])
            over_rows = len(current) + 1 > batch_size
            over_tokens = max_batch_tokens is not None and new_longest * (len(current) + 1) > max_batch_tokens
            if current and (over_rows or over_tokens):
                batches.append(current)
                current, new_longest = [], lengths[i]
            current.append(i)
            longest = new_longest
        if current:
            batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Labels are -100 on padding whatever the pad id is."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_for(tokenizer) -> int:
    """Any id works for padding (it is masked out of attention and labels); prefer the tokenizer's own."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
