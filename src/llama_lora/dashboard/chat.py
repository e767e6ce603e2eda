"""The dashboard's chat tab: the base and one or two runs' adapters answering one prompt, streamed.

It is `llama-lora serve`'s machinery, not a copy: the runs are loaded as served names on their one shared
base (`serve_adapters.load_served`: an adapter trained on another base is refused), and every answer goes
through serve's `Worker` and the generation engine, running in a background thread here. Each prompt is
rendered with its run's template and system prompt, as `infer` renders it. One set of runs is loaded at a
time; asking for another set replaces it. Nothing is loaded until the first chat.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from llama_lora.dashboard.views import DashboardError
from llama_lora.errors import LlamaLoraError

MAX_ADAPTERS = 2


class ChatModels:
    """The loaded set (base + adapters) and the engine answering for it."""

    def __init__(self, log=print, device: str = "auto"):
        self.log, self.device = log, device
        self.lock = threading.Lock()
        self.key: tuple[str, ...] | None = None
        self.served: dict = {}
        self.worker = None

    def ensure(self, runs: list[tuple[str, Path]]) -> dict:
        """The served names for `runs` ([(name, run directory)]), loading them unless already loaded."""
        from llama_lora.infer.serve_adapters import load_served
        from llama_lora.infer.serve_worker import Worker

        if not 1 <= len(runs) <= MAX_ADAPTERS:
            raise DashboardError(f"chat: choose one or {MAX_ADAPTERS} runs (got {len(runs)})")
        key = tuple(f"{name}={path}" for name, path in runs)
        with self.lock:
            if key != self.key:
                self.close()
                served = load_served(None, [(n, str(p)) for n, p in runs], device=self.device, log=self.log)
                worker = Worker(self.log)
                worker.prepare(list(served.values()))  # the engine and its decoders, before any request
                worker.engine.start()
                self.key, self.served, self.worker = key, served, worker
            return self.served

    def close(self) -> None:
        if self.worker is not None and self.worker.engine is not None:
            self.worker.engine.stop()
        self.key, self.served, self.worker = None, {}, None

    def answer(self, prompt: str, runs: list[tuple[str, Path]], max_tokens: int) -> Iterator[str]:
        """JSON lines: {"columns": [names]} first, then {"column", "text"} pieces as they come and one
        {"column", "done", "tokens", "finish"} (or {"column", "error"}) per column. Greedy, as `infer
        --greedy`: the columns differ by their adapters alone."""
        from llama_lora.infer.generate import GenerationSettings
        from llama_lora.infer.serve_worker import Job

        if not prompt.strip():
            raise DashboardError("chat: the prompt is empty")
        try:
            served = self.ensure(runs)
        except LlamaLoraError:
            raise
        except Exception as exc:  # a model that does not load: one line on the page
            raise DashboardError(f"chat: could not load the models ({type(exc).__name__}: {exc})") from None
        events: queue.Queue = queue.Queue()
        settings = GenerationSettings(max_new_tokens=max_tokens, greedy=True)
        jobs = []
        for name, view in served.items():

            def emit(kind: str, value, name=name) -> None:
                events.put((name, kind, value))

            jobs.append(Job(view, [{"role": "user", "content": prompt}], settings, [], None, emit))
        yield json.dumps({"columns": list(served)}) + "\n"
        for job in jobs:
            self.worker.submit(job)
        try:
            yield from _lines(events, len(jobs))
        finally:
            for job in jobs:  # the page went away: stop generating for it
                job.cancelled.set()


def _lines(events: queue.Queue, columns: int) -> Iterator[str]:
    ended = 0
    while ended < columns:
        name, kind, value = events.get()
        if kind == "text":
            yield json.dumps({"column": name, "text": value}) + "\n"
        elif kind == "done":
            ended += 1
            yield (
                json.dumps(
                    {
                        "column": name,
                        "done": True,
                        "tokens": value.completion_tokens,
                        "finish": value.finish_reason,
                    }
                )
                + "\n"
            )
        elif kind == "error":
            ended += 1
            yield json.dumps({"column": name, "error": value[1]}) + "\n"
