"""`llama-lora serve`: an OpenAI-compatible HTTP server for a base model and its adapters.

Built on FastAPI + uvicorn rather than `transformers serve`: that server renders prompts its own way, knows
nothing of a run's template and system prompt, and has no named adapters per request. Here every prompt goes
through `generate.render_prompt` and the same greedy decoding as `infer`, so the server answers what `infer`
does (`temperature: 0` is `infer --greedy`).

Several adapters share one base as PEFT named adapters, chosen per request by `model`; the base answers
under its own name with the adapters switched off. The adapters stay unmerged (PEFT's forward adds the
rank-r terms), unlike `infer`, which folds its one adapter into the weights: merging and unmerging whenever
the requested adapter changes would cost a pass over the weights at each switch and, since float addition
does not undo exactly, would let the base weights drift a little with every switch. Unmerged, every request
sees the very weights it was trained on, at some cost per token (DoRA's the most, bench/RESULTS.md).

Concurrency: the generation engine (engine.py, through serve_worker.py) owns the model in one thread; the
requests decode together in its running batch (up to `--max-sequences` at once, joining and leaving between tokens; one
adapter's requests at a time, the next adapter's joining when that batch has drained), and the endpoints
await their events. Past `--max-waiting` requests waiting for a place, a request gets 503 with Retry-After.
A request that fails answers that request alone; the engine goes on. A client that
disconnects has its generation cancelled at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llama_lora import run_dir
from llama_lora.data import templates
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import loading
from llama_lora.infer.serve_api import (
    ApiError,
    CompletionRequest,
    Reply,
    check_key,
    model_list,
    parse_request,
    read_json,
    requested_model,
    sse_error,
    usage,
)
from llama_lora.infer.serve_worker import Job, Worker
from llama_lora.meta import fingerprint_matches
from llama_lora.model import adapters, loader

API_KEY_ENV = "LLAMA_LORA_API_KEY"


class ServeError(LlamaLoraError):
    pass


# ------------------------------------------------------------------------------------------- loading


@dataclass
class Served:
    """One name clients can ask for: the shared model with one adapter active (`adapter`) or none."""

    name: str
    adapter: str | None  # PEFT adapter name; None is the base alone
    loaded: loading.Loaded  # shares model and tokenizer; its own template and system prompt


def run_name(path: str) -> str:
    """The name a run directory or adapter directory is served under when none is given: its run's."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "adapter" else p.name


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--adapter NAME=RUN_DIR` (or a bare RUN_DIR, named after its run directory) -> [(name, path)]."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = run_name(spec), spec
        if not name or not path:
            raise ServeError(f"--adapter: {spec!r} should be NAME=RUN_DIR")
        out.append((name, path))
    return out


def plan_served(
    model: str | None, adapter_specs: list[tuple[str, str]]
) -> tuple[str | None, list[tuple[str, str]]]:
    """(base model or None, [(name, path)] of the adapters): a positional run or adapter directory
    (`model`) is the first adapter, named after its run, on the base it was trained on."""
    specs = list(adapter_specs)
    base = model
    if model is not None and run_dir.adapter_dir_of(model) is not None:
        specs.insert(0, (run_name(model), model))
        base = None
    if base is None and not specs:
        raise ServeError("serve: give a MODEL, a RUN_DIR or --adapter NAME=RUN_DIR")
    names = [n for n, _ in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ServeError(f"--adapter: the name {doubled[0]} is given twice")
    return base, specs


def load_served(
    model: str | None, adapter_specs: list[tuple[str, str]], device: str = "auto", log=print
) -> dict[str, Served]:
    """The names to serve: the base under its model name, each adapter under its own. A positional run
    directory (`model`) is one more adapter, named after the directory, on the base it was trained on."""
    base, specs = plan_served(model, adapter_specs)
    first = specs[0][1] if specs else None
    loaded = loading.load(base=base, adapter=first, device=device, merge_in_memory=False, log=log)
    base_name = base or (loaded.source.base_name if loaded.source else "")
    if base_name in [n for n, _ in specs]:
        raise ServeError(f"--adapter: {base_name} is the base model's name; name the adapter otherwise")
    if not specs:
        return {base_name: Served(base_name, None, loaded)}
    base_view = dataclasses.replace(
        loaded, template=templates.choose_template(loaded.tokenizer, "auto"), system_prompt=None, source=None
    )
    served = {
        base_name: Served(base_name, None, base_view),
        specs[0][0]: Served(specs[0][0], "default", loaded),
    }
    for i, (name, path) in enumerate(specs[1:], 1):
        served[name] = add_served_adapter(loaded, base_name, name, path, f"adapter{i}")
    loaded.model.eval()
    return served


def add_served_adapter(
    loaded: loading.Loaded, base_name: str, name: str, path: str, peft_name: str
) -> Served:
    """Load one more adapter onto the shared model as PEFT adapter `peft_name`, refusing one trained on
    another base; its view keeps the template and system prompt it was trained with."""
    src = loading.find_adapter(path)
    loader.refuse_pickled(src.adapter_dir, src.cfg.model.allow_pickle if src.cfg else False, key="--adapter")
    same = (
        fingerprint_matches(src.fingerprint, loaded.model)
        if src.fingerprint is not None
        else src.base_name == base_name
    )
    if not same:
        raise ServeError(
            f"--adapter {name}: {path} was trained on {src.base_name}, not on the base the others use "
            f"({base_name}); serve it from a server of its own"
        )
    try:
        adapters.add_adapter(loaded.model, src.adapter_dir, peft_name)
    except RuntimeError as exc:  # size mismatch: an adapter made for another architecture
        raise ServeError(
            f"--adapter {name}: {path} does not fit {base_name}: {str(exc).splitlines()[0]}"
        ) from None
    trained = src.template or (src.cfg.data.template if src.cfg else None) or "auto"
    view = dataclasses.replace(
        loaded,
        template=templates.choose_template(loaded.tokenizer, trained),
        system_prompt=src.cfg.data.system_prompt if src.cfg else None,
        source=src,
        description=f"{base_name} + adapter {src.adapter_dir}",
    )
    return Served(name, peft_name, view)


# --------------------------------------------------------------------------------------------- the app


def create_app(served: dict[str, Served], worker: Worker, api_key: str | None, log=print):
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    created = int(time.time())
    add_error_handlers(app, log)

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request.headers, api_key)
        except ApiError as exc:
            return exc.response()
        return model_list([listed(s, base_of(served)) for s in served.values()], created)

    @app.get("/health")
    async def health():
        return Response(status_code=200)  # as vLLM's and SGLang's: up and serving, no key asked

    @app.get("/metrics")
    async def metrics():
        running, waiting = worker.load()
        return PlainTextResponse(
            worker.metrics.text(running, waiting), media_type="text/plain; version=0.0.4"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await Completion(request, True, served, worker, api_key, log).answer()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await Completion(request, False, served, worker, api_key, log).answer()

    return app


def base_of(served: dict[str, Served]) -> str | None:
    """The base model's served name (the one name without an adapter)."""
    return next((s.name for s in served.values() if s.adapter is None), None)


def listed(s: Served, base: str | None) -> tuple[str, str | None, str]:
    """(name, parent, root) of one served name for /v1/models."""
    if s.adapter is None:
        return s.name, None, s.name
    return s.name, base, str(s.loaded.source.adapter_dir) if s.loaded.source else s.name


def add_error_handlers(app: FastAPI, log) -> None:
    """Every error the framework raises answers as an OpenAI-style error object."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return ApiError(400, "invalid request").response()

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        log(f"serve: {request.url.path} failed: {type(exc).__name__}")
        return ApiError(500, f"internal error: {type(exc).__name__}").response()


class Completion:
    """One /v1/chat/completions or /v1/completions request: its body checked, its job queued for the
    worker, its answer whole or streamed, and its one log line."""

    def __init__(self, request: Request, chat: bool, served: dict[str, Served], worker: Worker, api_key, log):
        self.request, self.chat, self.served, self.worker = request, chat, served, worker
        self.api_key, self.log = api_key, log
        self.start, self.name, self.path = time.monotonic(), "-", request.url.path
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.job: Job | None = None
        self.first: float | None = None  # seconds to the first token

    def line(self, status: int, prompt: int = 0, completion: int = 0, note: str = "") -> None:
        self.worker.metrics.finished(status, prompt, completion)
        self.log(
            f"serve: {self.path} model={self.name} status={status} prompt_tokens={prompt} "
            f"completion_tokens={completion} time={time.monotonic() - self.start:.2f}s{note}"
        )

    async def answer(self):
        try:
            parsed = await self.parse()
        except ApiError as exc:
            self.line(exc.status)
            return exc.response()
        self.submit(parsed)
        kind, value = await self.next_event()
        if kind == "error":
            status, message = value
            self.line(status, note=" (cancelled)" if status == 499 else "")
            param = "messages" if self.chat and "prompt is" in message else None
            return ApiError(status, message, param).response()
        reply = Reply(self.name, self.chat, parsed.stream)
        if not parsed.stream:
            return await self.whole(reply, prompt_tokens=value)
        chunks = self.chunks(reply, value, parsed.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")

    async def parse(self) -> CompletionRequest:
        check_key(self.request.headers, self.api_key)
        body = await read_json(self.request)
        self.name = requested_model(body)
        return parse_request(body, self.served, self.chat, base_of(self.served))

    def submit(self, parsed: CompletionRequest) -> None:
        def emit(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

        served = self.served[parsed.model]
        self.job = Job(served, parsed.prompt, parsed.settings, parsed.stops, parsed.tools, emit)
        self.worker.submit(self.job)

    async def next_event(self, watch: bool = True) -> tuple[str, Any]:
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
                if event[0] in ("text", "done") and self.first is None:
                    self.first = time.monotonic() - self.start
                    self.worker.metrics.first_token(self.first)
                return event
            except asyncio.TimeoutError:
                if watch and await self.request.is_disconnected():
                    self.job.cancelled.set()
                    return ("error", (499, "the client went away"))

    async def whole(self, reply: Reply, prompt_tokens: int) -> JSONResponse:
        while True:
            kind, value = await self.next_event()
            if kind == "error":
                self.line(value[0], prompt_tokens, note=" (cancelled)" if value[0] == 499 else "")
                return ApiError(*value).response()
            if kind == "done":
                break
        self.line(200, value.prompt_tokens, value.completion_tokens)
        used = usage(value.prompt_tokens, value.completion_tokens)
        return JSONResponse(reply.whole(value.text, value.finish_reason, used))

    async def chunks(self, reply: Reply, prompt_tokens: int, include_usage: bool):
        finished = failed = False
        try:
            for chunk in reply.opening():
                yield chunk
            while True:
                kind, value = await self.next_event(watch=False)  # Starlette cancels us on disconnect
                if kind == "text":
                    yield reply.piece(value)
                elif kind == "done":
                    finished = True
                    used = usage(value.prompt_tokens, value.completion_tokens) if include_usage else None
                    for chunk in reply.ending(value.finish_reason, used):
                        yield chunk
                    self.line(200, value.prompt_tokens, value.completion_tokens, " (stream)")
                    return
                else:
                    failed = True
                    yield sse_error(value[1])
                    self.line(value[0], prompt_tokens, note=" (stream)")
                    return
        finally:
            if not finished:
                self.job.cancelled.set()
                if not failed:
                    self.line(499, prompt_tokens, note=" (stream, cancelled)")


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def serve(
    model: str | None,
    adapter_specs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "auto",
    log=_log,
    max_sequences: int = 16,
    max_waiting: int = 64,
) -> None:
    """Load the models, then answer requests until interrupted. The API key comes from `api_key` or the
    LLAMA_LORA_API_KEY environment variable; it is never logged."""
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    if not 1 <= port <= 65535:
        raise ServeError(f"--port: {port} is not a port number (1-65535)")
    with socket.socket() as probe:  # a clear line now instead of uvicorn's error after loading the model
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"--port: cannot listen on {host}:{port} ({exc.strerror})") from None
    served = load_served(model, parse_adapter_specs(adapter_specs), device=device, log=log)
    app = create_app(served, Worker(log, slots=max_sequences, max_waiting=max_waiting), key, log)
    auth = "API key required" if key else "no API key"
    log(f"serving {', '.join(served)} on http://{host}:{port}/v1 ({auth}); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
