"""`llama-lora serve`'s worker: requests prepared (rendered, checked) in the caller's thread and handed to
the generation engine (engine.py), whose one thread touches the model: concurrent requests decode together
in one running batch (requests for one adapter at a time: the next adapter's join when the batch drains).
A request that fails answers that request alone; the engine goes on. A request whose client went away is
cancelled at its next token."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama_lora.data import encoding, formats
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate
from llama_lora.infer.engine import Engine, Sequence
from llama_lora.infer.serve_api import Metrics, StopText
from llama_lora.model import adapters

if TYPE_CHECKING:
    from llama_lora.infer.serve_adapters import Served

SLOTS = 16  # sequences decoding at once
MAX_WAITING = 64  # sequences waiting for a slot; a request beyond them gets 503 (back-pressure)


@dataclass
class Job:
    served: Served
    prompt: list[formats.Message] | str  # chat messages, or plain text (completions)
    settings: generate.GenerationSettings
    stops: list[str]
    tools: list[dict[str, Any]] | None
    emit: Callable[[str, Any], None]  # (kind, value) to the waiting endpoint; thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Worker:
    """Hands jobs to the engine. Events per job: ("start", prompt_tokens), ("text", piece)..., then
    ("done", Outcome) or ("error", (status, message)) instead; emitted from the engine's thread."""

    def __init__(self, log=print, slots: int = SLOTS, max_waiting: int = MAX_WAITING):
        self.log, self.slots, self.max_waiting = log, slots, max_waiting
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.lock = threading.Lock()

    def engine_for(self, served: Served) -> Engine:
        """The one engine (every served name shares one model), made on first use; `run` drives it."""
        with self.lock:
            if self.engine is None:
                loaded = served.loaded
                self.engine = engine = Engine(
                    loaded.model,
                    loaded.stop_ids,
                    slots=self.slots,
                    context=generate.context_length(loaded.model),
                    # engine.model, not loaded.model: an adapter loaded at run time may replace the model
                    select=lambda adapter: adapters.use_adapter(engine.model, adapter),
                    log=self.log,
                    precision=loaded.precision,
                )
            return self.engine

    def run(self, served: list[Served], until: Callable[[], bool]) -> None:
        """Drive the engine from this thread (serve's main thread: Engine.run_here) until `until()`."""
        self.engine_for(served[0]).run_here(until)

    def prepare(self, served: list[Served]) -> None:
        """Make the engine and each served name's bf16 decoder now (in bf16; nothing in float32), so that no
        first request waits for one (before `run`: the calls run here and now)."""
        engine = self.engine_for(served[0])
        for future in [engine.call(lambda s=s: engine.prepare(s.adapter)) for s in served]:
            future.result()

    def load(self) -> tuple[int, int]:
        """(sequences decoding, sequences waiting) now."""
        engine = self.engine
        return (0, 0) if engine is None else (len(engine.live), len(engine.waiting))

    def submit(self, job: Job) -> None:
        try:
            ids = self._prompt_ids(job)
        except (LlamaLoraError, ValueError) as exc:
            job.emit("error", (400, str(exc)))
            return
        engine = self.engine_for(job.served)
        if len(engine.waiting) >= self.max_waiting:
            job.emit(
                "error", (503, f"the server is busy ({len(engine.waiting)} requests waiting); retry shortly")
            )
            return
        job.emit("start", len(ids))
        pieces = generate.TextPieces(job.served.loaded.tokenizer)
        cut = StopText(job.stops, lambda piece: job.emit("text", piece))

        def on_token(token: int) -> str | None:
            cut.feed(pieces.add(token))
            return "cancelled" if job.cancelled.is_set() else "stop" if cut.hit else None

        def on_end(seq: Sequence) -> None:
            if seq.finish == "error":
                job.emit("error", (500, f"internal error: {seq.error}"))
                return
            if job.cancelled.is_set():
                job.emit("error", (499, "the client went away"))
                return
            cut.feed(pieces.rest())
            cut.close()
            finish = "stop" if seq.finish == "stop" or cut.hit else "length"
            job.emit("done", Outcome(cut.text, len(ids), len(seq.tokens), finish))

        engine.submit(ids, job.settings, on_token=on_token, on_end=on_end, group=job.served.adapter)

    def _prompt_ids(self, job: Job) -> list[int]:
        view = dataclasses.replace(job.served.loaded, tools=job.tools) if job.tools else job.served.loaded
        if isinstance(job.prompt, str):
            ids = encoding.tokenize([(job.prompt, False)], view.tokenizer).input_ids
        else:
            ids = generate.render_prompt(view, job.prompt)
        generate.check_context(view, ids)
        return ids
