"""The loop's running state that is not the model: its counters (saved in every checkpoint) and the Ctrl-C
flag that turns the first interrupt into a checkpoint at the end of the step."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass


@dataclass
class Counters:
    """The loop's running totals; saved in each checkpoint so a resumed run's summary and metrics continue."""

    tokens_seen: int = 0
    train_time: float = 0.0
    micro_done: int = 0
    last_loss: float = float("nan")
    window_loss: float = 0.0  # sums since the last metrics record
    window_labels: int = 0
    window_tokens: int = 0
    window_time: float = 0.0
    processes: int = 1  # the data-parallel width: a checkpoint resumes only with the same one

    def add(self, loss_sum: float, units: int, tokens: int, micro_batches: int, seconds: float) -> None:
        self.train_time += seconds
        self.window_time += seconds
        self.window_loss += loss_sum
        self.window_labels += units
        self.window_tokens += tokens
        self.micro_done += micro_batches
        self.last_loss = loss_sum / units
        self.tokens_seen += tokens

    def take_window(self) -> dict[str, float]:
        record = {
            "loss": self.window_loss / self.window_labels,
            "tokens_per_second": self.window_tokens / self.window_time,
        }
        self.window_loss, self.window_labels, self.window_tokens, self.window_time = 0.0, 0, 0, 0.0
        return record


class SigintFlag:
    """While active, the first Ctrl-C only sets `requested` (the loop saves a checkpoint at the end of the
    step, then stops); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> SigintFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
