"""Prompt-only rows for GRPO: rows -> the prompt as generation sees it (token ids) + the row's other columns.

Row forms (the first that fits):

- `prompt`: a string (one user turn) or a list of messages (TRL's conversational prompt) ending on a user turn;
- `messages` / `conversations` (OpenAI, ShareGPT): the turns up to the last user turn are the prompt (a final
  assistant turn, a reference answer, is left out of the prompt);
- Alpaca: `instruction` (+ `input`) is the user turn (an `output` is left out).

A top-level `system` string (or `data.system_prompt`) opens the prompt, as in training. Every column of the
row except the prompt reaches the reward functions (TRL's signature: `answer=[...]`), `prompt` as the row gave
it: a string stays a string, messages stay messages (rewards.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama_lora.data import encoding, formats, placeholders, templates, tool_calls
from llama_lora.data.formats import Message
from llama_lora.errors import DataError

PROMPT_COLUMNS = ("prompt", "messages", "conversations", "instruction", "input", "output")


@dataclass
class PromptExample:
    input_ids: list[int]  # the prompt rendered with the template's generation prompt
    prompt: Any  # the prompt as reward functions receive it (TRL: a string or messages)
    columns: dict[str, Any] = field(default_factory=dict)  # the row's other columns, for the rewards
    messages: list[Message] = field(default_factory=list)  # the prompt's turns, system turn included
    row: int = 0  # its row in the split, for messages about it

    def __len__(self) -> int:  # a micro-batch plans by prompt length (completions come later)
        return len(self.input_ids)

    def sides(self) -> list[tuple[str, encoding.Example]]:
        """The prompt as `data inspect` shows it: nothing trained, generation starts after it."""
        return [("prompt", encoding.Example(self.input_ids, [encoding.IGNORE] * len(self.input_ids)))]


def prompt_messages(row: dict[str, Any], system_prompt: str | None) -> tuple[list[Message], Any]:
    """A row's prompt turns (ending on a user turn) and the prompt as rewards receive it."""
    if "prompt" in row and row["prompt"] is not None:
        given = row["prompt"]
        if isinstance(given, str):
            if not given.strip():
                raise ValueError("empty 'prompt'")
            turns: list[Message] = [{"role": "user", "content": given}]
        elif isinstance(given, list) and given:
            turns = formats._conversation({"messages": given})
        else:
            raise ValueError("'prompt' must be a string or a non-empty list of messages")
        msgs = formats.to_messages(
            {"messages": turns, "system": row.get("system")}, "messages", system_prompt
        )
    else:
        fmt = "alpaca" if row.get("instruction") is not None else formats.detect_format(row)
        if fmt in ("preference", "kto", "text", "prompt_completion"):
            raise ValueError(
                "no prompt: GRPO rows need a 'prompt' (a string or messages), 'messages' or 'instruction'"
            )
        msgs = formats.to_messages(row, fmt, system_prompt)
        given = None
    while msgs and msgs[-1]["role"] == "assistant":  # a reference answer is not part of the prompt
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("the prompt must end on a user turn")
    if not any(str(m.get("content") or "").strip() for m in msgs if m["role"] == "user"):
        raise ValueError("the prompt has no text")
    if given is None:
        given = [m for m in msgs if m["role"] != "system"]
    return msgs, given


def _example(row: dict[str, Any], index: int, tokenizer, dcfg, template: str) -> PromptExample:
    msgs, given = prompt_messages(row, dcfg.system_prompt)
    tools = tool_calls.row_tools(row) or None
    text = templates.prompt_text(msgs, tokenizer, template, tools)
    ids = encoding.tokenize([(text, False)], tokenizer).input_ids
    columns = {k: v for k, v in row.items() if k not in ("prompt",)}
    return PromptExample(ids, given, columns, msgs, index)


def prepare_prompts(
    rows: list[dict[str, Any]], tokenizer, dcfg, template: str, where: str = "data"
) -> tuple[list[PromptExample], encoding.PrepareStats]:
    """Rows -> prompts for generation, as `encoding.prepare` does for SFT rows. A prompt longer than
    `dcfg.max_length` is dropped (`truncation: drop` or `truncate`: a cut prompt would ask another question)
    or a bad row (`error`). Preference rows are a DataError: GRPO scores its own completions."""
    stats = encoding.PrepareStats(rows=len(rows))
    out: list[PromptExample] = []
    for index, row in enumerate(rows):
        kind = formats.preference_kind(row)
        if kind is not None:
            raise DataError(
                f"{where}: row {index} is {kind}; GRPO needs prompts (with the columns its rewards read), "
                "train these with train.objective: dpo, orpo or kto"
            )
        row = placeholders.fill_placeholders(row, dcfg.fill)
        ex = encoding.try_row(stats, index, where, _example, row, index, tokenizer, dcfg, template)
        if ex is None:
            continue
        if len(ex) > dcfg.max_length:
            if dcfg.truncation == "error":
                stats.bad_rows.append(
                    f"row {index}: {len(ex)} tokens, longer than max_length {dcfg.max_length}"
                )
            else:
                stats.dropped_too_long += 1
            continue
        out.append(ex)
    stats.kept = len(out)
    encoding.refuse_bad_rows(stats, dcfg, where, "have no usable prompt")
    return out, stats
