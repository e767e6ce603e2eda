"""The interface every training objective implements: what the loop (loop.py), build.attach, evaluation and
`compare` use of it, and nothing else. SFT (sft.py), DPO/ORPO (preference.py), KTO (kto.py) and GRPO
(grpo_objective.py) implement it; a new method is one more module here implementing the same members
(ARCHITECTURE.md: "A new objective"). `FixedExamples` gives the step members of objectives whose examples
are fixed before training (all but GRPO, which samples its completions at each step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    """`module(**batch)` returns `(loss_sum, units)`: the batch's summed loss and how many units it covers.
    A step divides the sum over its micro-batches by the units of the whole step (`units` per example), so
    gradient accumulation and data parallel give the single-process gradient."""

    module: torch.nn.Module

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Examples (or pairs) -> one batch of tensors for `module`."""
        ...

    def units(self, example: Any) -> int:
        """What one example contributes to the divisor of a step's summed loss."""
        ...

    def eval_batches(
        self, examples: Sequence[Any], batch_size: int, max_batch_tokens: int | None
    ) -> list[dict[str, torch.Tensor]]:
        """The fixed held-out batches evaluation runs `module` over."""
        ...

    def take_metrics(
        self, mode: str = "train", reduce: Callable[..., list[float]] | None = None
    ) -> dict[str, float]:
        """What the objective logs besides the loss since the last call ("train" or "eval"), summed over
        processes with `reduce`; {} when it logs nothing else."""
        ...

    def recording(self, on: bool) -> None:
        """Whether the next forwards count in `take_metrics` (off for a data-parallel step's weightless
        re-run of a micro-batch, parallel.my_share)."""
        ...

    def begin_step(
        self,
        step: int,
        micro_batches: Sequence[Sequence[Any]],
        mine: Sequence[tuple[Sequence[Any], float]],
        reduce: Callable[..., list[float]],
    ) -> tuple[float, int]:
        """Before optimizer step `step`: its micro-batches' examples (every process's) and this process's
        (examples, weight) share of them. Returns the step's units (the divisor of its summed loss) and its
        tokens, over all processes (`reduce` sums values across them; every process calls this)."""
        ...

    def progress(self) -> str:
        """What the progress bar shows besides the loss ("" for nothing)."""
        ...


class FixedExamples:
    """`begin_step` and `progress` for an objective whose examples are fixed before training: a step's units
    are its examples' `units`, its tokens their lengths."""

    def units(self, example: Any) -> int:
        raise NotImplementedError

    def begin_step(self, step, micro_batches, mine, reduce) -> tuple[float, int]:
        units = sum(self.units(e) for b in micro_batches for e in b)
        return units, sum(len(e) for b in micro_batches for e in b)

    def progress(self) -> str:
        return ""
