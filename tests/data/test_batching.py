"""Token-budget batching: every row once, budgets respected, deterministic."""

from __future__ import annotations

import random

import torch

from llama_lora.data.batching import collate, eval_batches, pad_id_for, plan_batches
from llama_lora.data.encoding import IGNORE, Example


def test_every_row_once_and_budget_respected():
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    batches = plan_batches(lengths, batch_size=8, max_batch_tokens=1024, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        assert len(b) <= 8
        assert max(lengths[i] for i in b) * len(b) <= 1024


def test_length_grouping_reduces_padding():
    rng = random.Random(2)
    lengths = [rng.randint(5, 500) for _ in range(512)]
    grouped = plan_batches(lengths, batch_size=8, max_batch_tokens=None, seed=0)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in grouped)
    naive = sum(max(lengths[i : i + 8]) * len(lengths[i : i + 8]) for i in range(0, 512, 8))
    assert padded < 0.75 * naive


def test_deterministic_per_seed_and_unshuffled_when_asked():
    lengths = list(range(1, 50))
    assert plan_batches(lengths, 4, None, seed=5) == plan_batches(lengths, 4, None, seed=5)
    assert plan_batches(lengths, 4, None, seed=5) != plan_batches(lengths, 4, None, seed=6)
    ordered = plan_batches(lengths, 4, None, seed=0, shuffle=False)
    assert [i for b in ordered for i in b] == list(range(49))


def test_row_longer_than_budget_gets_its_own_batch():
    batches = plan_batches([10, 5000, 10], batch_size=4, max_batch_tokens=100, seed=0, shuffle=False)
    assert [1] in batches


def test_collate_pads_right_and_masks_labels():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_collate_pads_left_for_generation():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=9, side="left")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, 4]]


def test_eval_batches_are_the_unshuffled_plan_collated():
    rng = random.Random(4)
    examples = [Example(list(range(n)), list(range(n))) for n in (rng.randint(1, 40) for _ in range(30))]
    expected = [
        collate([examples[i] for i in b], 0)
        for b in plan_batches([len(e) for e in examples], 4, 64, seed=0, shuffle=False)
    ]
    got = eval_batches(examples, 4, 64, pad_id=0)
    assert len(got) == len(expected) > 1
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_pad_id_policy():
    from types import SimpleNamespace as Tok

    assert pad_id_for(Tok(pad_token_id=5, unk_token_id=0, eos_token_id=2), fallback=7) == 5
    assert pad_id_for(Tok(pad_token_id=None, unk_token_id=3, eos_token_id=2)) == 3  # inputs: any id
    assert pad_id_for(Tok(pad_token_id=None, unk_token_id=3, eos_token_id=2), fallback=7) == 7  # generation
    assert pad_id_for(Tok(pad_token_id=None, unk_token_id=None, eos_token_id=None)) == 0
