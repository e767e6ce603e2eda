"""`llama-lora serve`: an OpenAI-compatible HTTP server for a base model and its adapters.

Built on FastAPI + uvicorn rather than `transformers serve`: that server renders prompts its own way, knows
nothing of a run's template and system prompt, and has no named adapters per request. Here every prompt goes
through `generate.render_prompt` / `generate.generate_ids`, so the server answers exactly what `infer` does
(`temperature: 0` is `infer --greedy`).

Several adapters share one base as PEFT named adapters, chosen per request by `model`; the base answers
under its own name with the adapters switched off. The adapters stay unmerged (PEFT's forward adds the
rank-r terms), unlike `infer`, which folds its one adapter into the weights: merging and unmerging whenever
the requested adapter changes would cost a pass over the weights at each switch and, since float addition
does not undo exactly, would let the base weights drift a little with every switch. Unmerged, every request
sees the very weights it was trained on, at some cost per token (DoRA's the most, bench/RESULTS.md).

Concurrency: one worker thread owns the model and serves requests one at a time from a queue; the endpoints
await their results, so any number of clients can wait without touching the model together. A request that
fails (even with an unexpected exception) answers that request alone; the worker goes on. A client that
disconnects has its generation stopped at the next token (a stopping criterion reads the request's flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llama_lora.data import encoding, formats, templates
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate, loading
from llama_lora.infer.serve_api import ApiError, StopText, parse_chat, parse_settings, read_json
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


def is_adapter(path: str) -> bool:
    p = Path(path)
    return (p / "adapter" / "adapter_config.json").is_file() or (p / "adapter_config.json").is_file()


def run_name(path: str) -> str:
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


def load_served(
    model: str | None, adapter_specs: list[tuple[str, str]], device: str = "auto", log=print
) -> dict[str, Served]:
    """The names to serve: the base under its model name, each adapter under its own. A positional run
    directory (`model`) is one more adapter, named after the directory, on the base it was trained on."""
    specs = list(adapter_specs)
    base = model
    if model is not None and is_adapter(model):
        specs.insert(0, (run_name(model), model))
        base = None
    if base is None and not specs:
        raise ServeError("serve: give a MODEL, a RUN_DIR or --adapter NAME=RUN_DIR")
    names = [n for n, _ in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ServeError(f"--adapter: the name {doubled[0]} is given twice")
    first = specs[0][1] if specs else None
    loaded = loading.load(base=base, adapter=first, device=device, merge_in_memory=False, log=log)
    base_name = base or (loaded.source.base_name if loaded.source else "")
    if base_name in names:
        raise ServeError(f"--adapter: {base_name} is the base model's name; name the adapter otherwise")
    if not specs:
        return {base_name: Served(base_name, None, loaded)}
    tokenizer = loaded.tokenizer
    base_view = dataclasses.replace(
        loaded, template=templates.choose_template(tokenizer, "auto"), system_prompt=None, source=None
    )
    served = {
        base_name: Served(base_name, None, base_view),
        specs[0][0]: Served(specs[0][0], "default", loaded),
    }
    for i, (name, path) in enumerate(specs[1:], 1):
        src = loading.find_adapter(path)
        loader.refuse_pickled(
            src.adapter_dir, src.cfg.model.allow_pickle if src.cfg else False, key="--adapter"
        )
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
            adapters.add_adapter(loaded.model, src.adapter_dir, f"adapter{i}")
        except RuntimeError as exc:  # size mismatch: an adapter made for another architecture
            raise ServeError(
                f"--adapter {name}: {path} does not fit {base_name}: {str(exc).splitlines()[0]}"
            ) from None
        trained = src.template or (src.cfg.data.template if src.cfg else None) or "auto"
        view = dataclasses.replace(
            loaded,
            template=templates.choose_template(tokenizer, trained),
            system_prompt=src.cfg.data.system_prompt if src.cfg else None,
            source=src,
            description=f"{base_name} + adapter {src.adapter_dir}",
        )
        served[name] = Served(name, f"adapter{i}", view)
    loaded.model.eval()
    return served


# -------------------------------------------------------------------------------------- the worker


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


# --------------------------------------------------------------------------------------------- the app


def create_app(served: dict[str, Served], worker: Worker, api_key: str | None, log=print):
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    created = int(time.time())

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

    def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except ApiError as exc:
            return exc.response()
        rows = [{"id": n, "object": "model", "created": created, "owned_by": "llama-lora"} for n in served]
        return {"object": "list", "data": rows}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool):
        start, name, path = time.monotonic(), "-", request.url.path

        def line(status: int, prompt: int = 0, completion: int = 0, note: str = "") -> None:
            log(
                f"serve: {path} model={name} status={status} prompt_tokens={prompt} "
                f"completion_tokens={completion} time={time.monotonic() - start:.2f}s{note}"
            )

        try:
            check_key(request)
            body = await read_json(request)
            if not isinstance(body.get("model"), str):
                raise ApiError(400, "'model' must be the name of a served model (GET /v1/models)", "model")
            name = body["model"]
            if name not in served:
                raise ApiError(
                    404,
                    f"the model {name!r} is not served here (GET /v1/models lists them)",
                    "model",
                    "model_not_found",
                )
            settings, stops = parse_settings(body)
            if chat:
                prompt, tools = parse_chat(body)
            else:
                prompt, tools = body.get("prompt"), None
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError(400, "'stream' must be true or false", "stream")
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
        except ApiError as exc:
            line(exc.status)
            return exc.response()

        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(served[name], prompt, settings, stops, tools, emit)
        worker.submit(job)

        async def next_event(watch: bool = True):
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if watch and await request.is_disconnected():
                        job.cancelled.set()
                        return ("error", (499, "the client went away"))

        kind, value = await next_event()
        if kind == "error":
            status, message = value
            line(status, note=" (cancelled)" if status == 499 else "")
            param = "messages" if chat and "prompt is" in message else None
            return ApiError(status, message, param).response()
        prompt_tokens = value
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": name}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if stream:
                delta = (
                    {"role": "assistant", "content": ""}
                    if first
                    else {}
                    if text is None
                    else {"content": text}
                )
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

        def usage(out: Outcome) -> dict:
            return {
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
            }

        if not stream:
            while kind != "done":
                kind, value = await next_event()
                if kind == "error":
                    line(value[0], prompt_tokens, note=" (cancelled)" if value[0] == 499 else "")
                    return ApiError(*value).response()
            line(200, value.prompt_tokens, value.completion_tokens)
            obj = "chat.completion" if chat else "text_completion"
            body = {
                **head,
                "object": obj,
                "choices": [choice(value.text, value.finish_reason)],
                "usage": usage(value),
            }
            return JSONResponse(body)

        obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps({**head, 'object': obj, **payload}, ensure_ascii=False)}\n\n"

        async def chunks():
            finished = failed = False
            try:
                if chat:
                    yield sse({"choices": [choice(None, None, first=True)]})
                while True:
                    kind, value = await next_event(watch=False)  # Starlette cancels us on disconnect
                    if kind == "text":
                        yield sse({"choices": [choice(value, None)]})
                    elif kind == "done":
                        finished = True
                        yield sse({"choices": [choice(None, value.finish_reason)]})
                        if include_usage:
                            yield sse({"choices": [], "usage": usage(value)})
                        yield "data: [DONE]\n\n"
                        line(200, value.prompt_tokens, value.completion_tokens, " (stream)")
                        return
                    else:
                        failed = True
                        error = {"message": value[1], "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        line(value[0], prompt_tokens, note=" (stream)")
                        return
            finally:
                if not finished:
                    job.cancelled.set()
                    if not failed:
                        line(499, prompt_tokens, note=" (stream, cancelled)")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


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
    app = create_app(served, Worker(log), key, log)
    auth = "API key required" if key else "no API key"
    log(f"serving {', '.join(served)} on http://{host}:{port}/v1 ({auth}); Ctrl-C stops")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
