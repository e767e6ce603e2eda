"""What `infer` and `chat` do with generation: `--prompts-file` rows (any training format) in and JSON
lines out, the interactive multi-turn chat session, and streaming to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llama_lora.data import formats, sources
from llama_lora.errors import LlamaLoraError
from llama_lora.infer.generate import GenerationSettings, generate, generate_many
from llama_lora.infer.loading import InferenceError, Loaded


def stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def prompt_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a prompts file, in any training data format."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"--prompts-file: {path} not found")
    try:
        return sources.load_rows(str(p), "train")
    except LlamaLoraError as exc:
        raise InferenceError(f"--prompts-file: {exc}") from None


def row_prompt(row: dict[str, Any]) -> tuple[list[formats.Message], str | None]:
    fmt = formats.detect_format(row)
    if fmt == "text":
        raise InferenceError("--prompts-file: plain-text rows have no prompt/response split")
    messages = formats.to_messages(row, fmt)
    reference = formats.reference_answer(messages)
    if reference is not None:
        messages = messages[:-1]
    return messages, reference


def generate_rows(
    loaded: Loaded,
    rows: list[dict[str, Any]],
    settings: GenerationSettings,
    sink,
    where: str,
    chunk: int = 32,
) -> int:
    """`infer --prompts-file`: one JSON line per row on `sink` (prompt, generation, stopped, and the
    reference answer when the row has one), in row order. Rows generate `chunk` at a time through the engine
    (`generate_many`: a batch decodes together), each chunk's lines flushed when it ends. Returns the number
    written."""
    for first in range(0, len(rows), chunk):
        parsed = []
        for i, row in enumerate(rows[first : first + chunk], first):
            try:
                parsed.append(row_prompt(row))
            except (ValueError, LlamaLoraError) as exc:
                raise InferenceError(f"{where}: row {i}: {exc}") from None
        results = generate_many(loaded, [messages for messages, _ in parsed], settings, batch_size=chunk)
        for (messages, reference), result in zip(parsed, results):
            record = {"prompt": messages[-1]["content"], "generation": result.text, "stopped": result.stopped}
            if reference is not None:
                record["reference"] = reference
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()
    return len(rows)


def chat_session(loaded: Loaded, settings: GenerationSettings, read, note) -> None:
    """`llama-lora chat`: read a line (`read()`, EOFError ends), answer it streamed to stdout, keep the
    history; `/reset` clears it, `/exit` or `/quit` ends. An error (e.g. the conversation outgrew the
    context) is a `note` and the session goes on without that turn."""
    history: list[formats.Message] = []
    while True:
        try:
            text = read().strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            note("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        try:
            reply = generate(loaded, history, settings, stream=stdout_writer)
        except LlamaLoraError as exc:
            history.pop()
            note(f"\nerror: {exc} (use /reset)")
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.text})
