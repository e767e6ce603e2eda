"""The OpenAI side of `llama-lora serve`: request bodies -> messages and GenerationSettings, the API key,
OpenAI-style errors, the 1 MiB body limit, `stop` strings cut out of streamed text, and the answers' shapes
(chat.completion / text_completion objects, SSE chunks, usage). No model, no HTTP server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from llama_lora.data import formats, tool_calls
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate

MAX_BODY = 1 << 20  # bytes of request body accepted (1 MiB)


RETRY_AFTER_S = 1  # what a 503 (the waiting queue full) tells the client to wait


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self):
        from fastapi.responses import JSONResponse

        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} from {low:g} to {high:g}, got {value!r}", key)
    return value


def parse_settings(body: dict) -> tuple[generate.GenerationSettings, list[str]]:
    """OpenAI's sampling parameters -> GenerationSettings (temperature 0 is greedy) and the stop strings."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, 1 << 20, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "'n' must be 1", "n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    settings = generate.GenerationSettings(
        max_new_tokens=max_tokens,
        greedy=temperature == 0,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # OpenAI has no top-k
        seed=seed,
    )
    return settings, stops


def parse_chat(body: dict) -> tuple[list[formats.Message], list[dict[str, Any]] | None]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    try:
        tools = tool_calls.parse_tools(body.get("tools")) or None
        return formats.to_messages({"messages": messages}, "messages"), tools
    except (ValueError, LlamaLoraError) as exc:
        param = "tools" if "tool" in str(exc) else "messages"
        raise ApiError(400, f"'{param}': {exc}", param) from None


def check_key(headers, api_key: str | None) -> None:
    """Refuse a request without `Authorization: Bearer <api_key>` when the server has a key."""
    if api_key and headers.get("authorization", "") != f"Bearer {api_key}":
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")


@dataclass
class CompletionRequest:
    """A /v1/chat/completions or /v1/completions body, checked."""

    model: str
    prompt: list[formats.Message] | str  # chat messages, or plain text (completions)
    tools: list[dict[str, Any]] | None
    settings: generate.GenerationSettings
    stops: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def requested_model(body: dict) -> str:
    """The body's `model`, which must be a string (whether it is served is `parse_request`'s question)."""
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "'model' must be the name of a served model (GET /v1/models)", "model")
    return body["model"]


def parse_prompt(body: dict) -> str:
    """/v1/completions' `prompt`: one non-empty string (or a list of exactly one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
    return prompt


def resolve_model(name: str, served: Collection[str], base: str | None) -> str:
    """The served name a request's `model` means: a served name itself, or SGLang's `base:adapter`."""
    if name not in served and base is not None and name.startswith(base + ":"):
        adapter = name[len(base) + 1 :]
        if adapter in served and adapter != base:
            return adapter
    return name


def parse_request(
    body: dict, served: Collection[str], chat: bool, base: str | None = None
) -> CompletionRequest:
    """Check a completion body in the order clients see the errors: model, sampling, prompt, streaming.
    `base`: the base model's served name, for `base:adapter`."""
    name = resolve_model(requested_model(body), served, base)
    if name not in served:
        raise ApiError(
            404,
            f"the model {name!r} is not served here (GET /v1/models lists them)",
            "model",
            "model_not_found",
        )
    settings, stops = parse_settings(body)
    prompt, tools = parse_chat(body) if chat else (parse_prompt(body), None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return CompletionRequest(name, prompt, tools, settings, stops, stream, include_usage)


async def read_json(request) -> dict:
    """The request body as a JSON object, refusing more than MAX_BODY bytes before reading them."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class StopText:
    """Cuts streamed text at the first of the request's `stop` strings; text that may be the start of one
    is held back until it is known not to be."""

    def __init__(self, stops: list[str], emit: Callable[[str], None]):
        self.stops, self.emit = [s for s in stops if s], emit
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece: str) -> None:
        if self.hit or not piece:
            return
        self.text += piece
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[: min(found)], True
            self._send(len(self.text))
            return
        hold = max(
            (
                k
                for s in self.stops
                for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:k])
            ),
            default=0,
        )
        self._send(len(self.text) - hold)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto

    def close(self) -> None:
        if not self.hit:
            self._send(len(self.text))


# ------------------------------------------------------------------------------------------- answers


def model_list(models: list[tuple[str, str | None, str]], created: int) -> dict:
    """GET /v1/models from (name, parent, root) per served name, as vLLM lists them: an adapter's `parent`
    is its base's name and its `root` its directory; the base has no parent and is its own root."""
    rows = [
        {
            "id": n,
            "object": "model",
            "created": created,
            "owned_by": "llama-lora",
            "parent": parent,
            "root": root,
        }
        for n, parent, root in models
    ]
    return {"object": "list", "data": rows}


class Metrics:
    """What GET /metrics reports, in Prometheus' text format: requests by status, tokens in and out, time to
    first token, and (read when asked) the sequences running and waiting. Updated from the server's loop."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.requests: dict[int, int] = {}
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft_counts = [0] * len(self.BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0

    def finished(self, status: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens

    def first_token(self, seconds: float) -> None:
        self.ttft_sum, self.ttft_count = self.ttft_sum + seconds, self.ttft_count + 1
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.ttft_counts[i] += 1

    def text(self, running: int, waiting: int) -> str:
        p = "llama_lora_"
        lines = [
            f"# HELP {p}requests_total Finished requests by HTTP status.",
            f"# TYPE {p}requests_total counter",
        ]
        lines += [f'{p}requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        for name, value, kind, text in (
            ("prompt_tokens_total", self.prompt_tokens, "counter", "Prompt tokens of finished requests."),
            ("generation_tokens_total", self.generation_tokens, "counter", "Tokens generated."),
            ("num_requests_running", running, "gauge", "Sequences decoding now."),
            ("num_requests_waiting", waiting, "gauge", "Sequences waiting for a slot."),
        ):
            lines += [f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"]
        name = f"{p}time_to_first_token_seconds"
        lines += [f"# HELP {name} From the request's arrival to its first token.", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.ttft_counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.ttft_count}', f"{name}_sum {self.ttft_sum:.6f}"]
        lines += [f"{name}_count {self.ttft_count}"]
        return "\n".join(lines) + "\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse_error(message: str) -> str:
    """The SSE event for a stream that fails after it has begun (its status line is already sent)."""
    error = {"message": message, "type": "server_error", "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"


class Reply:
    """The OpenAI objects of one answer: the whole chat.completion / text_completion, or its SSE chunks.
    Made when generation starts (its `created`)."""

    def __init__(self, model: str, chat: bool, stream: bool):
        self.chat, self.stream = chat, stream
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.head = {"id": ident, "created": int(time.time()), "model": model}

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if self.stream:
            delta = (
                {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            )
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str, used: dict) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": obj, "choices": [self.choice(text, finish)], "usage": used}

    def sse(self, payload: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': obj, **payload}, ensure_ascii=False)}\n\n"

    def opening(self) -> list[str]:
        """Chat streams begin with the assistant's role and no text; text completions with nothing."""
        return [self.sse({"choices": [self.choice(None, None, first=True)]})] if self.chat else []

    def piece(self, text: str) -> str:
        return self.sse({"choices": [self.choice(text, None)]})

    def ending(self, finish: str, used: dict | None) -> list[str]:
        """The finish_reason chunk, the usage chunk when asked for (`used`), and [DONE]."""
        chunks = [self.sse({"choices": [self.choice(None, finish)]})]
        if used is not None:
            chunks.append(self.sse({"choices": [], "usage": used}))
        return [*chunks, "data: [DONE]\n\n"]
