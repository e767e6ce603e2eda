"""Data: load rows, detect their format, render them with a template, tokenize with the prompt masked.

The chain is a set of plain functions, each testable on three-line inputs:

    row --to_messages--> messages --render_segments--> [(text, trainable)] --tokenize--> ids + labels

Labels are -100 on prompt tokens (unless `train_on_prompt`) and on padding. They are never derived from the
pad id, so a tokenizer whose pad token equals its EOS token still learns the EOS that closes each response.
Batching (token budgets, length grouping) lives in `batching.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llama_lora.errors import DataError

IGNORE = -100
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Strings that close an assistant turn in common chat templates (Llama 3, ChatML/SmolLM2, Phi, Gemma).
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
Message = dict[str, str]


# ------------------------------------------------------------------------------------------- sources


def bundled_dir() -> Path:
    return Path(str(resources.files("llama_lora") / "demo_data"))


def _local_files(path: Path, split: str) -> dict[str, str]:
    """data_files for the split named by `split` (`train[:10%]` names `train`). A directory holds one file
    per split (`train.jsonl`, `eval.jsonl`, ...); a single file is the split `train`."""
    name = re.match(r"[\w.-]*", split).group(0)  # type: ignore[union-attr]
    if path.is_dir():
        files = {
            p.stem: str(p)
            for p in sorted(path.iterdir())
            if p.suffix in LOCAL_EXTENSIONS and p.name != "probe.json"
        }
        if name not in files:
            raise DataError(
                f"data.split: {path} has no split {name!r} (it has: {', '.join(files) or 'none'})"
            )
        return {name: files[name]}
    return {"train": str(path)}


def _builder(files: dict[str, str]) -> str:
    kinds = {LOCAL_EXTENSIONS[Path(f).suffix] for f in files.values()}
    if len(kinds) != 1:
        raise DataError(f"data.source: mixed file types {sorted(kinds)} in one source")
    return kinds.pop()


def _check_json(path: Path) -> None:
    """Name the line of the first malformed JSON/JSONL record (the datasets library does not)."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data.source: {path} is empty (no rows)")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: malformed JSON at line {number}: {exc.msg}") from None


def load_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of `source` for a split expression such as `train`, `train[:1%]` or `eval`."""
    import datasets

    datasets.disable_progress_bars()
    path = bundled_dir() if source == "demo" else Path(source).expanduser()
    local = source == "demo" or path.exists() or path.suffix in LOCAL_EXTENSIONS
    try:
        if local:
            if not path.exists():
                raise DataError(f"data.source: file {source} not found")
            files = _local_files(path, split)
            for f in files.values():
                if Path(f).stat().st_size == 0:
                    raise DataError(f"data.source: {f} is empty (no rows)")
                if f.endswith((".json", ".jsonl")):
                    _check_json(Path(f))
            ds = datasets.load_dataset(_builder(files), data_files=files, split=split)
        else:
            from llama_lora import hub

            if not hub.offline_mode():
                hub.require_hub(source, "dataset")
            try:
                ds = datasets.load_dataset(source, split=split)
            except (ConnectionError, OSError) as exc:
                raise hub.explain(exc, source, "dataset") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DataError(f"data.source: cannot read {source} ({reason})") from None
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise DataError(f"data.split: cannot take split {split!r} of {source}: {msg}") from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = str(exc.__cause__ or exc).splitlines()[0]
        raise DataError(f"{source}: could not read the rows ({cause})") from None
    return [dict(r) for r in ds]


def load_probe(source: str) -> dict[str, Any] | None:
    """The behaviour probe a dataset directory declares in `probe.json` (None when it has none)."""
    path = bundled_dir() if source == "demo" else Path(source).expanduser()
    probe = path / "probe.json" if path.is_dir() else path.with_name("probe.json")
    return json.loads(probe.read_text()) if probe.is_file() else None


# ------------------------------------------------------------------------------------------- formats


def detect_format(row: dict[str, Any]) -> str:
    keys = {k for k, v in row.items() if v is not None}  # datasets fills absent columns with None
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"data.format: cannot tell the format from the columns {sorted(keys)}; expected alpaca "
        "(instruction/input/output), messages, prompt/completion or text"
    )


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def to_messages(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> list[Message]:
    """One row in any supported format -> chat messages. Plain text becomes a single `text` message."""
    if fmt == "alpaca":
        instruction, extra = _text(row.get("instruction")).strip(), _text(row.get("input")).strip()
        if not instruction:
            raise ValueError("empty 'instruction'")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [{"role": "user", "content": user}]
        if "output" in row and row["output"] is not None:
            msgs.append({"role": "assistant", "content": _text(row["output"])})
        system = _text(row.get("system")).strip() or system_prompt
    elif fmt == "messages":
        raw = row.get("messages") if row.get("messages") is not None else row.get("conversations")
        if not isinstance(raw, list) or not raw:
            raise ValueError("'messages' must be a non-empty list")
        msgs = []
        for m in raw:
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role not in _SHAREGPT_ROLES or content is None:
                raise ValueError(f"bad message {m!r}")
            msgs.append({"role": _SHAREGPT_ROLES[role], "content": _text(content)})
        system = system_prompt if msgs[0]["role"] != "system" else None
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _text(row.get("prompt"))}]
        if row.get("completion") is not None:
            msgs.append({"role": "assistant", "content": _text(row["completion"])})
        system = system_prompt
    elif fmt == "text":
        return [{"role": "text", "content": _text(row.get("text"))}]
    else:
        raise DataError(f"data.format: unknown format {fmt!r}")
    return ([{"role": "system", "content": system}] if system else []) + msgs


def reference_answer(messages: list[Message]) -> str | None:
    last = messages[-1]
    return last["content"] if last["role"] == "assistant" else None


# ------------------------------------------------------------------------------------------ rendering


def choose_template(tokenizer, requested: str) -> str:
    if requested != "auto":
        if requested == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.template: chat requested but this tokenizer has no chat template (use alpaca)"
            )
        return requested
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def alpaca_prompt(messages: list[Message]) -> str:
    """The seed's layout: `### Instruction:` / optional `### Input:` / `### Response:` on their own lines.

    `messages` is everything before the response: optional system, then user (and, in a chat, earlier
    assistant) turns. A user turn written as `instruction\\n\\ninput` (how alpaca rows become messages) is
    split back into the Instruction and Input blocks; the Input block is left out when there is no input.
    Earlier turns of a conversation are rendered as earlier Instruction/Response blocks.
    """
    text = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    for m in messages:
        if m["role"] == "user":
            instruction, _, extra = m["content"].partition("\n\n")
            text += f"### Instruction:\n{instruction}\n"
            if extra:
                text += f"### Input:\n{extra}\n"
            text += "### Response:\n"
        elif m["role"] == "assistant":
            text += f"{m['content']}\n"
    return text


def _apply_chat(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _closing_token(tokenizer, after: str) -> str:
    """The end-of-turn string that follows an assistant message in the rendered text ('' if none)."""
    candidates = [t for t in (getattr(tokenizer, "eos_token", None), *END_OF_TURN) if t]
    found = [(after.find(t), t) for t in candidates if after.find(t) != -1]
    if not found:
        return ""
    pos, tok = min(found)
    return after[: pos + len(tok)] if after[:pos].strip() == "" else ""


def render_segments(messages: list[Message], tokenizer, template: str) -> list[tuple[str, bool]]:
    """Rendered text as (piece, trainable) segments; trainable = an assistant response and its end token.

    Every response ends with the end-of-turn/EOS token, and that token is trainable, so the model learns
    to stop. Text after it (such as a template's newline) is not.
    """
    eos = tokenizer.eos_token or ""
    if messages and messages[0]["role"] == "text":
        return [(messages[0]["content"] + eos, True)]
    if template == "alpaca":  # one trained response: the last one
        answer = reference_answer(messages)
        prompt = alpaca_prompt(messages[:-1] if answer is not None else messages)
        return [(prompt, False)] + ([(answer + eos, True)] if answer is not None else [])

    segments: list[tuple[str, bool]] = []
    done = 0  # characters of the final text already placed in segments
    full = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _apply_chat(tokenizer, messages[:i], generation_prompt=True)
        full = _apply_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(prefix) or len(prefix) < done:
            raise DataError(
                "data.template: this chat template does not render turns as a growing prefix; "
                "use template: alpaca"
            )
        segments.append((prefix[done:], False))
        reply = full[len(prefix) :]
        start = reply.find(msg["content"])
        if start == -1:
            raise DataError("data.template: the chat template changes assistant text; use template: alpaca")
        content_end = start + len(msg["content"])
        closing = _closing_token(tokenizer, reply[content_end:])
        if closing:
            segments.append((reply[: content_end + len(closing)], True))
            done = len(prefix) + content_end + len(closing)
        else:  # the template does not close the turn: add EOS ourselves so the model learns to stop
            segments.append((reply[:content_end] + eos, True))
            done = len(prefix) + content_end
            full = full[:done] + eos + full[done:]
            done += len(eos)
    if not segments:  # no assistant message: a prompt for generation
        return [(_apply_chat(tokenizer, messages, generation_prompt=True), False)]
    if full[done:]:
        segments.append((full[done:], False))
    return [(text, train) for text, train in segments if text]


def prompt_text(messages: list[Message], tokenizer, template: str) -> str:
    """The text a model is given at inference: everything before the final assistant response."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return "".join(t for t, _ in render_segments(messages, tokenizer, template))


# ----------------------------------------------------------------------------------------- tokenizing


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize(segments: list[tuple[str, bool]], tokenizer, train_on_prompt: bool = False) -> Example:
    """Segments -> token ids and labels (-100 where not trained). Segments are tokenized one by one,
    the way the prompt alone is tokenized at inference, so training and generation see the same ids."""
    ids: list[int] = []
    labels: list[int] = []
    text0 = segments[0][0] if segments else ""
    if _adds_bos(tokenizer) and not text0.startswith(tokenizer.bos_token):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if (trainable or train_on_prompt) else [IGNORE] * len(piece))
    return Example(ids, labels)


@dataclass
class PrepareStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as longer than max_length")
        if self.dropped_no_labels:
            parts.append(f"{self.dropped_no_labels} dropped with no response tokens left")
        if self.bad_rows:
            parts.append(f"skipped {len(self.bad_rows)} bad rows (first: {self.bad_rows[0]})")
        return ", ".join(parts)


def prepare(
    rows: list[dict[str, Any]], tokenizer, dcfg, template: str, fmt: str | None = None, where: str = "data"
) -> tuple[list[Example], PrepareStats]:
    """Rows -> tokenized examples, applying truncation and counting what was cut or dropped.

    Rows that cannot be used (missing fields, no response) are a DataError naming the first one and their
    count, unless `dcfg.skip_bad_rows`, when they are skipped and counted in the stats."""
    stats = PrepareStats(rows=len(rows))
    examples: list[Example] = []
    for index, row in enumerate(rows):
        try:
            row_fmt = fmt or (dcfg.format if dcfg.format != "auto" else detect_format(row))
            messages = to_messages(row, row_fmt, dcfg.system_prompt)
            if row_fmt != "text" and reference_answer(messages) is None:
                raise ValueError("no response to train on")
        except (ValueError, TypeError, AttributeError, DataError) as exc:
            stats.bad_rows.append(f"row {index}: {exc}")
            continue
        ex = tokenize(render_segments(messages, tokenizer, template), tokenizer, dcfg.train_on_prompt)
        if len(ex) > dcfg.max_length:
            if dcfg.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.input_ids[: dcfg.max_length], ex.labels[: dcfg.max_length])
            stats.truncated += 1
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped_no_labels += 1
            continue
        examples.append(ex)
    stats.kept = len(examples)
    if stats.bad_rows and not dcfg.skip_bad_rows:
        raise DataError(
            f"{where}: {len(stats.bad_rows)} of {stats.rows} rows lack required fields (first: "
            f"{stats.bad_rows[0]}); fix them or set data.skip_bad_rows: true to skip them"
        )
    return examples, stats
