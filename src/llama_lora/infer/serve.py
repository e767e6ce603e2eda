"""`llama-lora serve`: an OpenAI-compatible HTTP server for a base model and its adapters.

Built on FastAPI + uvicorn rather than `transformers serve`: that server renders prompts its own way, knows
nothing of a run's template and system prompt, and has no named adapters per request. Here every prompt goes
through `generate.render_prompt` and the same greedy decoding as `infer` at the same `--precision`, so the
server answers what `infer` does (`temperature: 0` is `infer --greedy`).

Several adapters share one base as PEFT named adapters, chosen per request by `model`; the base answers
under its own name with the adapters switched off. In bf16 (`--precision auto` where the hardware computes it
natively, or `bf16`) each served name decodes on its own bf16 copies of the weights with its adapter folded
in (decode.py; made at start-up, or when an adapter is loaded at run time, and dropped when it is unloaded):
no cost per token for an adapter, one copy of the weights per name in memory. In float32 the adapters stay
unmerged (PEFT's forward adds the rank-r terms) rather than merged at every switch, which would cost a pass
over the weights each time and, since float addition does not undo exactly, let the base weights drift: every
request sees the very weights it was trained on, at some cost per token (DoRA's the most, bench/RESULTS.md).
The bf16 copies are made without touching the model (PEFT's merge arithmetic on a copy).

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
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llama_lora.infer.serve_adapters import (
    AdapterUpdates,
    Served,
    ServeError,
    load_served,
    parse_adapter_specs,
)
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

__all__ = ["ServeError", "Served", "create_app", "serve"]

API_KEY_ENV = "LLAMA_LORA_API_KEY"


# --------------------------------------------------------------------------------------------- the app


def create_app(
    served: dict[str, Served],
    worker: Worker,
    api_key: str | None,
    log=print,
    allow_adapter_updates: bool = False,
):
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    created = int(time.time())
    add_error_handlers(app, log)
    updates = AdapterUpdates(served, worker, allow_adapter_updates, log)

    async def update(request: Request, change) -> Response:
        try:
            check_key(request.headers, api_key)
            return PlainTextResponse(await change(await read_json(request)))
        except ApiError as exc:
            log(f"serve: {request.url.path} status={exc.status}")
            return exc.response()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await update(request, updates.load)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await update(request, updates.unload)

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


def check_listen(host: str, port: int) -> None:
    """One line (exit 2) for a port that is not one or that cannot be listened on, before anything loads."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port: {port} is not a port number (1-65535)")
    with socket.socket() as probe:
        # as uvicorn binds: connections closed a moment ago (TIME_WAIT) do not block the port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"--port: cannot listen on {host}:{port} ({exc.strerror})") from None


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
    allow_adapter_updates: bool = False,
    precision: str = "auto",
) -> None:
    """Load the models, then answer requests until interrupted. The API key comes from `api_key` or the
    LLAMA_LORA_API_KEY environment variable; it is never logged. `allow_adapter_updates`: adapters may be
    loaded and unloaded at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter). `precision`:
    generation's (auto, bf16, fp32; module doc)."""
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    check_listen(host, port)  # a clear line now instead of uvicorn's error after loading the model
    served = load_served(
        model, parse_adapter_specs(adapter_specs), device=device, log=log, precision=precision
    )
    worker = Worker(log, slots=max_sequences, max_waiting=max_waiting)
    worker.prepare(list(served.values()))
    app = create_app(served, worker, key, log, allow_adapter_updates)
    auth = "API key required" if key else "no API key"
    updates = "; adapters may be loaded and unloaded" if allow_adapter_updates else ""
    decoding = next(iter(served.values())).loaded.precision
    log(f"serving {', '.join(served)} on http://{host}:{port}/v1 ({auth}; {decoding}{updates}); Ctrl-C stops")
    # HTTP in a thread, the engine in the main thread (torch's kernels run slower in any other thread); the
    # main thread takes the signals: Ctrl-C or SIGTERM ends the server gracefully, a second Ctrl-C at once
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    http = threading.Thread(target=server.run, name="llama-lora-http", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http.start()
    worker.run(list(served.values()), until=lambda: not http.is_alive())
    if not server.started:  # uvicorn said why on stderr
        raise ServeError(f"serve: the HTTP server did not start on {host}:{port}")
