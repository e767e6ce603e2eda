"""Per-sequence sampling for the engine (engine.py): each sequence of a batch brings its own settings and its
own seeded generator, so a request samples what it would sample alone whatever else shares its batch.

The order of operations is transformers' `generate` order: repetition penalty (over the prompt and the tokens
so far: a positive logit divided by the penalty, a negative one multiplied), then temperature, top-k, top-p;
greedy takes the arg-max after the penalty. The draws come from the sequence's own `torch.Generator` (seeded
from `seed`, or from torch's global generator where no seed is given), so the same request with the same seed
samples the same tokens, alone or in a batch; they are not the draws `generate` makes from the global
generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """One sequence's generation settings."""

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        return torch.Generator().manual_seed(seed)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row of logits (float32) for the token ids in `seen`."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    logits = logits.clone()
    logits.scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
    return logits


def choose(logits: torch.Tensor, settings: Sampling, generator: torch.Generator) -> int:
    """The next token from one row of (penalised) float32 logits."""
    if settings.greedy:
        return int(logits.argmax())
    scores = logits / max(settings.temperature, 1e-5)
    if 0 < settings.top_k < scores.shape[0]:
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - settings.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
