"""Batches by token budget, grouped by length, so no row is padded to max_length.

The seed padded every row to 1024 tokens; a typical Alpaca row is ~150. Here a micro-batch holds at most
`batch_size` rows and at most `max_batch_tokens` tokens counted as rows x longest row (what padding costs),
so memory is bounded by the budget whatever the row lengths are.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from llama_lora.data.encoding import IGNORE, Example


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


def collate(
    examples: list[Example], pad_id: int, side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest row: on the right for training and evaluation, on the left for generation (every
    prompt then ends in the last column, where the new tokens go). Labels are -100 on padding whatever the pad
    id is."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.tensor(ex.input_ids)
        labels[row, cols] = torch.tensor(ex.labels)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_batches(
    examples: list[Example], batch_size: int, max_batch_tokens: int | None, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Held-out `examples` as right-padded batches in a fixed order (the unshuffled plan, seed 0).

    Training's evaluations and `compare` both batch through here with the run's `train.batch_size` and token
    budget, so the same examples give them the same batches and the same loss."""
    plan = plan_batches([len(e) for e in examples], batch_size, max_batch_tokens, seed=0, shuffle=False)
    return [collate([examples[i] for i in b], pad_id) for b in plan]


def pad_id_for(tokenizer, fallback: int | None = None) -> int:
    """The id to pad with: the tokenizer's pad token, else `fallback`, else its unk or EOS token, else 0.

    Inputs (training, evaluation) need no `fallback`: any id works there, as padding is masked out of
    attention and labels. Generation passes its first stop token: transformers also writes the pad id into
    the output of rows that finished early, so there it should be a token that ends a reply (transformers'
    own default is EOS too).
    """
    for candidate in (tokenizer.pad_token_id, fallback, tokenizer.unk_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
