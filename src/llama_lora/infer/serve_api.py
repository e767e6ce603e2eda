"""The OpenAI side of `llama-lora serve`: request bodies -> messages and GenerationSettings, OpenAI-style
errors, the 1 MiB body limit, and `stop` strings cut out of streamed text. No model, no HTTP server."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llama_lora.data import formats
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate

MAX_BODY = 1 << 20  # bytes of request body accepted (1 MiB)


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
        return JSONResponse(body, status_code=self.status)


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
        tools = formats.parse_tools(body.get("tools")) or None
        return formats.to_messages({"messages": messages}, "messages"), tools
    except (ValueError, LlamaLoraError) as exc:
        param = "tools" if "tool" in str(exc) else "messages"
        raise ApiError(400, f"'{param}': {exc}", param) from None


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
