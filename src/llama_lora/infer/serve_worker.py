"""`llama-lora serve`'s worker: the one thread that touches the model, serving queued requests one at a
time. A request that fails (even with an unexpected exception) answers that request alone; the worker goes
on. A request whose client went away is stopped at the next token (a stopping criterion reads its flag)."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llama_lora.data import encoding, formats
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate
from llama_lora.infer.serve_api import StopText
from llama_lora.model import adapters

if TYPE_CHECKING:
    from llama_lora.infer.serve import Served


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
    """The one thread that touches the model. Events per job: ("start", prompt_tokens), ("text", piece)...,
    then ("done", Outcome) or ("error", (status, message)) instead."""

    def __init__(self, log=print):
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.log = log
        self.thread = threading.Thread(target=self._loop, name="llama-lora-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                job.emit("error", (499, "the client went away"))
                continue
            try:
                job.emit("done", self._serve(job))
            except (LlamaLoraError, ValueError) as exc:
                job.emit("error", (400, str(exc)))
            except Exception as exc:  # never let one request take the server down
                self.log(f"serve: request failed: {type(exc).__name__}: {exc}")
                job.emit("error", (500, f"internal error: {type(exc).__name__}"))

    def _serve(self, job: Job) -> Outcome:
        served = job.served
        view = dataclasses.replace(served.loaded, tools=job.tools) if job.tools else served.loaded
        if isinstance(job.prompt, str):
            ids = encoding.tokenize([(job.prompt, False)], view.tokenizer).input_ids
        else:
            ids = generate.render_prompt(view, job.prompt)
        generate.check_context(view, ids)
        job.emit("start", len(ids))
        cut = StopText(job.stops, lambda piece: job.emit("text", piece))
        with adapters.use_adapter(view.model, served.adapter):
            result = generate.generate_ids(
                view,
                ids,
                job.settings,
                stream=cut.feed,
                should_stop=lambda: cut.hit or job.cancelled.is_set(),
            )
        cut.close()
        finish = "stop" if result.stopped or cut.hit else "length"
        return Outcome(cut.text if cut.hit else result.text, len(ids), len(result.token_ids), finish)
