"""Data: load rows, detect their format, render them with a template, tokenize with the prompt masked.

The chain is a set of plain functions, each testable on three-line inputs:

    row --to_messages--> messages --render_segments--> [(text, trainable)] --tokenize--> ids + labels

Labels are -100 on prompt tokens (unless `train_on_prompt`) and on padding. They are never derived from the
pad id, so a tokenizer whose pad token equals its EOS token still learns the EOS that closes each response.
Row formats (detection, row -> messages, tool calls, placeholders) live in `formats.py` and are importable
from here; batching (token budgets, length grouping) lives in `batching.py`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llama_lora import formats
from llama_lora.errors import DataError, LlamaLoraError
from llama_lora.formats import Message as Message
from llama_lora.formats import detect_format as detect_format
from llama_lora.formats import fill_placeholders as fill_placeholders
from llama_lora.formats import placeholder_warnings as placeholder_warnings
from llama_lora.formats import placeholders as placeholders
from llama_lora.formats import reference_answer as reference_answer
from llama_lora.formats import to_messages as to_messages

IGNORE = -100
LOCAL_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
}
# Strings that close an assistant turn in common chat templates (Llama 3, ChatML/SmolLM2, Phi, Gemma).
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


# ------------------------------------------------------------------------------------------- sources


BUNDLED = {"demo": "", "demo-pairs": "pairs"}  # data.source aliases -> folders of demo_data/


def bundled_dir(source: str = "demo") -> Path:
    return Path(str(resources.files("llama_lora") / "demo_data" / BUNDLED[source]))


def source_path(source: str) -> Path:
    return bundled_dir(source) if source in BUNDLED else Path(source).expanduser()


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
    for f in files.values():
        if Path(f).suffix not in LOCAL_EXTENSIONS:
            raise DataError(
                f"data.source: {f}: cannot read {Path(f).suffix or 'extension-less'} files "
                f"(use {', '.join(LOCAL_EXTENSIONS)} or a hub dataset id)"
            )
    kinds = {LOCAL_EXTENSIONS[Path(f).suffix] for f in files.values()}
    if len(kinds) != 1:
        raise DataError(f"data.source: mixed file types {sorted(kinds)} in one source")
    return kinds.pop()


def _records(value: Any, path: Path) -> list[Any]:
    """The rows a parsed .json file holds: a list of records, one record, or an object holding exactly one
    list of records (`{"version": 1, "data": [...]}`)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        try:
            formats.detect_format(value)
            return [value]
        except DataError:
            pass
        lists = [
            v for v in value.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
        ]
        if len(lists) == 1:
            return lists[0]
        raise DataError(
            f"{path}: the top-level JSON object is neither a record nor holds exactly one list of records "
            f"(keys: {', '.join(map(str, value)) or 'none'})"
        )
    raise DataError(f"{path}: expected records (a JSON list or object), found a JSON {type(value).__name__}")


def _read_local(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json, .jsonl or .txt file, read here rather than by `datasets` so that a UTF-8 BOM, CRLF
    line ends, a top-level object, rows with differing fields and a malformed line (named) are all handled.
    A .txt file is a document a line; blank lines are skipped."""
    text = path.read_bytes().decode("utf-8-sig")
    if not text.strip():
        raise DataError(f"data.source: {path} is empty (no rows)")
    if path.suffix == ".txt":
        return [{"text": line.removesuffix("\r")} for line in text.split("\n") if line.strip()]
    rows: list[Any] | None = None
    if path.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            rows = _records(json.loads(text), path)
        except json.JSONDecodeError as exc:
            if not (text.lstrip().startswith("{") and exc.msg == "Extra data"):  # else: JSON lines
                raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if rows is None:
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in a string
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: malformed JSON at line {number}: {exc.msg}") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index} is a JSON {type(row).__name__}, not an object of fields")
    return rows


def _take_split(rows: list[dict[str, Any]], name: str, split: str) -> list[dict[str, Any]]:
    """`train[:10%]`, `train[5:20]+train[-5:]`: the same split expressions (and rounding) as `datasets`."""
    import datasets

    spans = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(rows)})
    return [row for span in spans for row in rows[span.from_ : span.to]]


def load_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of `source` for a split expression such as `train`, `train[:1%]` or `eval`.

    Local .json/.jsonl/.txt files are read by `_read_local`; .csv, .parquet and hub datasets by `datasets`.
    Every failure is a DataError naming the source (and the line or row where known)."""
    import datasets

    datasets.disable_progress_bars()
    path = source_path(source)
    local = source in BUNDLED or path.exists() or path.suffix in LOCAL_EXTENSIONS
    try:
        if local:
            if not path.exists():
                raise DataError(f"data.source: file {source} not found")
            files = _local_files(path, split)
            for f in files.values():
                if Path(f).stat().st_size == 0:
                    raise DataError(f"data.source: {f} is empty (no rows)")
            builder = _builder(files)
            if builder in ("json", "text"):
                name, f = next(iter(files.items()))
                return _take_split(_read_local(Path(f)), name, split)
            extra = {"encoding": "utf-8-sig"} if builder == "csv" else {}  # a BOM is not a column name
            ds = datasets.load_dataset(builder, data_files=files, split=split, **extra)
        else:
            from llama_lora import hub

            if not hub.offline_mode():
                hub.require_hub(source, "dataset")
            try:
                ds = datasets.load_dataset(source, split=split)
            except (ConnectionError, OSError) as exc:
                raise hub.explain(exc, source, "dataset") from None
        return [dict(r) for r in ds]
    except LlamaLoraError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DataError(f"data.source: cannot read {source} ({reason})") from None
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise DataError(f"data.split: cannot take split {split!r} of {source}: {msg}") from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = str(exc.__cause__ or exc).splitlines()[0]
        raise DataError(f"{source}: could not read the rows ({cause})") from None
    except Exception as exc:  # anything else still becomes one line, never a traceback
        raise DataError(f"{source}: could not read the rows ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def split_rows(dcfg, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and held-out rows, from `eval_split` or a seeded `eval_fraction` of the source."""
    rows = load_rows(dcfg.source, dcfg.split)
    if dcfg.eval_split:
        held = load_rows(dcfg.source, dcfg.eval_split)
    elif dcfg.eval_fraction > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * dcfg.eval_fraction))
        held = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    else:
        held = []
    if dcfg.max_rows is not None:
        rows = rows[: dcfg.max_rows]
    return rows, held


def load_probe(source: str) -> dict[str, Any] | None:
    """The behaviour probe a dataset directory declares in `probe.json` (None when it has none)."""
    path = source_path(source)
    probe = path / "probe.json" if path.is_dir() else path.with_name("probe.json")
    return json.loads(probe.read_text()) if probe.is_file() else None


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


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas and tool calls itself: its source refers
    to both `tools` and `tool_calls` (Llama-3.1+, Qwen2.5, Mistral, Hermes do; SmolLM2, Llama-3.0 do not)."""
    source = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(source, dict):  # named templates, e.g. {"default": ..., "tool_use": ...}
        source = "\n".join(map(str, source.values()))
    source = str(source)
    return bool(re.search(r"\btools\b", source) and re.search(r"\btool_calls\b", source))


def for_template(
    messages: list[Message], tools: list[dict[str, Any]] | None, tokenizer, template: str
) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """Messages and tools as the template will take them: unchanged for a chat template with tool support,
    else the plain rendering (`formats.plain_tool_messages`, docs/data.md) and no separate tools."""
    if not formats.uses_tools(messages, tools):
        return messages, None
    if template == "chat" and supports_tools(tokenizer):
        return messages, tools or None
    return formats.plain_tool_messages(messages, tools), None


def _apply_chat(tokenizer, messages: list[Message], generation_prompt: bool, tools=None) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
    )


def _closing_token(tokenizer, after: str) -> str:
    """The end-of-turn string that follows an assistant message in the rendered text ('' if none)."""
    candidates = [t for t in (getattr(tokenizer, "eos_token", None), *END_OF_TURN) if t]
    found = [(after.find(t), t) for t in candidates if after.find(t) != -1]
    if not found:
        return ""
    pos, tok = min(found)
    return after[: pos + len(tok)] if after[:pos].strip() == "" else ""


def _turn_end(tokenizer, reply: str) -> tuple[int, str]:
    """Where a tool-call turn the template wrote itself ends: (position, end-of-turn token), or the end of
    its text and '' when no end-of-turn token follows."""
    candidates = [t for t in (getattr(tokenizer, "eos_token", None), *END_OF_TURN) if t]
    found = [(reply.find(t), t) for t in candidates if reply.find(t) != -1]
    return min(found) if found else (len(reply.rstrip()), "")


def render_segments(
    messages: list[Message], tokenizer, template: str, tools: list[dict[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """Rendered text as (piece, trainable) segments; trainable = an assistant response and its end token.

    Every response ends with the end-of-turn/EOS token, and that token is trainable, so the model learns
    to stop. Text after it (such as a template's newline) is not. Tool calls are assistant turns and are
    trained; tool results, like system and user turns, are not. `tools` are the conversation's tool schemas.
    """
    eos = tokenizer.eos_token or ""
    if messages and messages[0]["role"] == "text":
        return [(messages[0]["content"] + eos, True)]
    messages, tools = for_template(messages, tools, tokenizer, template)
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
        prefix = _apply_chat(tokenizer, messages[:i], True, tools)
        full = _apply_chat(tokenizer, messages[: i + 1], False, tools)
        if not full.startswith(prefix) or len(prefix) < done:
            raise DataError(
                "data.template: this chat template does not render turns as a growing prefix; "
                "use template: alpaca"
            )
        segments.append((prefix[done:], False))
        reply = full[len(prefix) :]
        if msg.get("tool_calls"):  # the template writes the call its own way: train all it writes
            content_end, closing = _turn_end(tokenizer, reply)
        else:
            start = reply.find(msg["content"])
            if start == -1:
                raise DataError(
                    "data.template: the chat template changes assistant text; use template: alpaca"
                )
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
        return [(_apply_chat(tokenizer, messages, True, tools), False)]
    if full[done:]:
        segments.append((full[done:], False))
    return [(text, train) for text, train in segments if text]


def prompt_text(
    messages: list[Message], tokenizer, template: str, tools: list[dict[str, Any]] | None = None
) -> str:
    """The text a model is given at inference: everything before the final assistant response, rendered
    with the conversation's `tools` exactly as training renders them."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return "".join(t for t, _ in render_segments(messages, tokenizer, template, tools))


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
    truncated_examples: list[int] = field(default_factory=list)  # indices of kept examples cut to max_length

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
    from jinja2 import TemplateError

    stats = PrepareStats(rows=len(rows))
    examples: list[Example] = []
    for index, row in enumerate(rows):
        kind = formats.preference_kind(row)
        if kind is not None:  # never train a rejected or undesirable answer as a good one
            raise formats.refuse_preference(kind, where, index)
        row = fill_placeholders(row, dcfg.fill)
        try:
            row_fmt = fmt or (dcfg.format if dcfg.format != "auto" else detect_format(row))
            messages = to_messages(row, row_fmt, dcfg.system_prompt)
            if row_fmt != "text" and reference_answer(messages) is None:
                raise ValueError("no response to train on")
            tools = formats.row_tools(row) if row_fmt in ("messages", "tools") else None
            segments = render_segments(messages, tokenizer, template, tools)
        except TemplateError as exc:  # e.g. a template that allows one tool call per turn
            stats.bad_rows.append(f"row {index}: the chat template refused it ({exc})")
            continue
        except (ValueError, TypeError, AttributeError, KeyError, DataError) as exc:
            if isinstance(exc, DataError) and str(exc).startswith("data.template:"):
                raise  # the template, not the row, is the problem
            stats.bad_rows.append(f"row {index}: {exc}")
            continue
        except Exception as exc:  # anything else: one line naming the row, never a traceback
            raise DataError(f"{where}: row {index}: cannot be rendered ({_reason(exc)})") from None
        try:
            ex = tokenize(segments, tokenizer, dcfg.train_on_prompt)
        except Exception as exc:
            raise DataError(f"{where}: row {index}: cannot be tokenized ({_reason(exc)})") from None
        cut = len(ex) > dcfg.max_length
        if cut:
            if dcfg.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.input_ids[: dcfg.max_length], ex.labels[: dcfg.max_length])
            stats.truncated += 1
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped_no_labels += 1
            continue
        if cut:
            stats.truncated_examples.append(len(examples))
        examples.append(ex)
    stats.kept = len(examples)
    refuse_bad_rows(stats, dcfg, where, "lack required fields")
    return examples, stats


def refuse_bad_rows(stats: PrepareStats, dcfg, where: str, what: str) -> None:
    """Bad rows stop the run in one line naming the first and their count, unless data.skip_bad_rows."""
    if stats.bad_rows and not dcfg.skip_bad_rows:
        raise DataError(
            f"{where}: {len(stats.bad_rows)} of {stats.rows} rows {what} (first: "
            f"{stats.bad_rows[0]}); fix them or set data.skip_bad_rows: true to skip them"
        )
