"""Encoding: `[(text, trained?)]` segments -> an `Example` (token ids and labels), and a whole split prepared
with counts of what was truncated or dropped.

Labels are -100 on prompt tokens (unless `train_on_prompt`) and on padding. They are never derived from the
pad id, so a tokenizer whose pad token equals its EOS token still learns the EOS that closes each response.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llama_lora.data import formats, tool_calls
from llama_lora.data.formats import (
    detect_format,
    reference_answer,
    to_messages,
)
from llama_lora.data.placeholders import fill_placeholders
from llama_lora.data.sources import _reason
from llama_lora.data.templates import render_segments
from llama_lora.errors import DataError

IGNORE = -100
T = TypeVar("T")


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


def fit_prompt(examples: list[Example], prompt: int, limit: int, tokenizer) -> tuple[list[Example], int]:
    """Examples sharing their first `prompt` tokens (one SFT row, or a pair's two sides), longer than
    `limit`: the prompt cut from the left (its end kept, a tokenizer-added BOS kept first) so that the
    longest answer fits, keeping at least half of `limit` for the prompt where it has that many tokens, as
    TRL's keep-end truncation does; the caller then cuts the answers' tails. (examples, prompt tokens kept)."""
    answer = max(len(ex) for ex in examples) - prompt
    keep = min(prompt, max(limit - answer, limit // 2))
    if keep == prompt:
        return examples, prompt
    head = 1 if _adds_bos(tokenizer) else 0
    start = head + prompt - keep
    return [
        Example(ex.input_ids[:head] + ex.input_ids[start:], ex.labels[:head] + ex.labels[start:])
        for ex in examples
    ], keep


@dataclass
class PrepareStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    prompts_cut: int = 0  # rows (or pairs) whose prompt was cut from the left to fit max_length
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    bad_rows: list[str] = field(default_factory=list)
    truncated_examples: list[int] = field(default_factory=list)  # indices of kept examples cut to max_length

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.prompts_cut:
            parts.append(f"{self.prompts_cut} prompts cut from the left to fit max_length")
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
        kind = formats.preference_kind(row)
        if kind is not None:  # never train a rejected or undesirable answer as a good one
            raise formats.refuse_preference(kind, where, index)
        row = fill_placeholders(row, dcfg.fill)
        segments = try_row(stats, index, where, _segments, row, tokenizer, dcfg, template, fmt)
        if segments is None:
            continue
        try:
            ex = tokenize(segments, tokenizer, dcfg.train_on_prompt)
        except Exception as exc:
            raise DataError(f"{where}: row {index}: cannot be tokenized ({_reason(exc)})") from None
        ex = within_max_length(ex, index, dcfg, tokenizer, stats)
        if ex is None:
            continue
        if all(label == IGNORE for label in ex.labels[1:]):
            stats.dropped_no_labels += 1
            continue
        if len(stats.truncated_examples) < stats.truncated:  # this one's answer was cut
            stats.truncated_examples.append(len(examples))
        examples.append(ex)
    stats.kept = len(examples)
    refuse_bad_rows(stats, dcfg, where, "lack required fields")
    return examples, stats


def _segments(row: dict[str, Any], tokenizer, dcfg, template: str, fmt: str | None) -> list[tuple[str, bool]]:
    row_fmt = fmt or (dcfg.format if dcfg.format != "auto" else detect_format(row))
    messages = to_messages(row, row_fmt, dcfg.system_prompt)
    if row_fmt != "text" and reference_answer(messages) is None:
        raise ValueError("no response to train on")
    tools = tool_calls.row_tools(row) if row_fmt in ("messages", "tools") else None
    return render_segments(messages, tokenizer, template, tools, dcfg.train_on_reasoning)


def try_row(stats: PrepareStats, index: int, where: str, make: Callable[..., T], *args: Any) -> T | None:
    """`make(*args)` for row `index`, or None when the row is bad: its reason (a chat template's refusal too) is
    counted in `stats.bad_rows`. A problem with the template itself (`data.template: ...`) stops the run, and
    anything unexpected stops it in one line naming the row, never a traceback."""
    from jinja2 import TemplateError

    try:
        return make(*args)
    except TemplateError as exc:  # e.g. a template that allows one tool call per turn
        stats.bad_rows.append(f"row {index}: the chat template refused it ({exc})")
    except (ValueError, TypeError, AttributeError, KeyError, DataError) as exc:
        if isinstance(exc, DataError) and str(exc).startswith("data.template:"):
            raise  # the template, not the row, is the problem
        stats.bad_rows.append(f"row {index}: {exc}")
    except Exception as exc:
        raise DataError(f"{where}: row {index}: cannot be rendered ({_reason(exc)})") from None
    return None


def within_max_length(ex: Example, index: int, dcfg, tokenizer, stats: PrepareStats) -> Example | None:
    """`ex` fitted to `dcfg.max_length` as `dcfg.truncation` says (docs/config.md), counted in `stats`; None
    when it is dropped or a bad row."""
    limit = dcfg.max_length
    if len(ex) <= limit:
        return ex
    if dcfg.truncation == "error":
        stats.bad_rows.append(f"row {index}: {len(ex)} tokens, longer than max_length {limit}")
        return None
    if dcfg.truncation == "drop":
        stats.dropped_too_long += 1
        return None
    first = next((i for i, label in enumerate(ex.labels) if label != IGNORE), len(ex))
    if first < len(ex):  # the prompt's beginning goes first, then the answer's tail
        (ex,), kept = fit_prompt([ex], first, limit, tokenizer)
        stats.prompts_cut += kept < first
    if len(ex) > limit:
        ex = Example(ex.input_ids[:limit], ex.labels[:limit])
        stats.truncated += 1
    return ex


def refuse_bad_rows(stats: PrepareStats, dcfg, where: str, what: str) -> None:
    """Bad rows stop the run in one line naming the first and their count, unless data.skip_bad_rows."""
    if stats.bad_rows and not dcfg.skip_bad_rows:
        raise DataError(
            f"{where}: {len(stats.bad_rows)} of {stats.rows} rows {what} (first: "
            f"{stats.bad_rows[0]}); fix them or set data.skip_bad_rows: true to skip them"
        )
