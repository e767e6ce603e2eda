"""Row formats: tell a row's format, turn the row into chat messages (content given as a string or as typed
parts). Tool schemas and tool calls: tool_calls.py; `{{name}}` placeholders: placeholders.py.

Formats (`data.format`): `alpaca`, `messages` (OpenAI `role/content` or ShareGPT `from/value`), `tools`
(messages with tool calls: ShareGPT `function_call`/`observation` turns with a `tools` JSON string, or
OpenAI assistant `tool_calls` and `tool` messages with a `tools` list), `prompt_completion` and `text`.
Preference pairs (`chosen`/`rejected`) and KTO rows (a boolean `label`) are recognised here only to be refused
(pairs.py and kto.py read them): trained as plain messages they would teach the rejected and undesirable
answers too.

Messages are dicts with `role` and `content`; an assistant message may also hold `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": {...}}}]`, the form chat templates take), and
a tool result is `{"role": "tool", "content": ...}`. Templates without tool support get the plain
rendering of `tool_calls.plain_tool_messages` instead (docs/data.md).
"""

from __future__ import annotations

import json
from typing import Any

from llama_lora.data.tool_calls import Message, assistant_text, parse_calls
from llama_lora.errors import DataError

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
    "bot": "assistant",  # turbo-alignment
}
_CALL_ROLES = {"function_call"}  # ShareGPT (LLaMA-Factory): an assistant turn that is a tool call
_RESULT_ROLES = {"observation", "tool", "function", "ipython"}  # a tool's answer


def _present(row: dict[str, Any]) -> set[str]:
    return {k for k, v in row.items() if v is not None}  # datasets fills absent columns with None


def _turns(row: dict[str, Any]) -> Any:
    return row.get("messages") if row.get("messages") is not None else row.get("conversations")


def preference_kind(row: dict[str, Any]) -> str | None:
    """What kind of preference data `row` is (None for rows with one response to learn)."""
    keys = _present(row)
    if {"chosen_messages", "rejected_messages"} & keys:
        return "preference pairs (LLaMA-Factory v1: chosen_messages/rejected_messages)"
    if {"preferred_output", "non_preferred_output"} & keys:
        return "preference pairs (OpenAI: input/preferred_output/non_preferred_output)"
    if {"chosen", "rejected"} <= keys:
        if hh_transcripts(row):
            return "preference pairs (HH-RLHF transcripts)"
        if "conversations" in keys or "messages" in keys:
            return "preference pairs (ShareGPT: conversations + chosen/rejected)"
        if isinstance(row["chosen"], list):
            return "preference pairs (chosen/rejected message lists)"
        return "preference pairs (prompt/chosen/rejected)"
    if isinstance(row.get("is_desirable"), bool):
        return "KTO data (turbo-alignment: context/answer/is_desirable)"
    if isinstance(row.get("label"), bool) or isinstance(row.get("kto_tag"), bool):
        shape = "prompt/completion" if "completion" in keys else "messages"
        return f"KTO data ({shape} with a boolean desirable/undesirable label)"
    return None


def hh_transcripts(row: dict[str, Any]) -> bool:
    """Whether `row` is an HH-RLHF pair: `chosen` and `rejected` whole `\n\nHuman: ...` transcripts, no prompt."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    return prompt is None and isinstance(rejected, str) and str(chosen).startswith("\n\nHuman:")


def refuse_preference(kind: str, where: str, index: int | None = None) -> DataError:
    at = f" (row {index})" if index is not None else ""
    if kind.startswith("KTO"):
        return DataError(
            f"{where}: the rows are {kind}{at}; train them with train.objective: kto, "
            "not as rows with one good response each"
        )
    return DataError(
        f"{where}: the rows are {kind}{at}; train them with train.objective: dpo (or orpo, kto), "
        "not as rows with one good response each"
    )


def _has_tool_turns(turns: Any) -> bool:
    if not isinstance(turns, list):
        return False
    for m in turns:
        if isinstance(m, dict) and (
            m.get("tool_calls") or m.get("function_call") or m.get("role", m.get("from")) in _CALL_ROLES
        ):
            return True
        if isinstance(m, dict) and m.get("role", m.get("from")) in _RESULT_ROLES:
            return True
    return False


def detect_format(row: dict[str, Any]) -> str:
    """The format of one row, from its columns (see the module docstring)."""
    keys = _present(row)
    kind = preference_kind(row)
    if kind is not None:
        return "kto" if kind.startswith("KTO") else "preference"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "messages" in keys or "conversations" in keys:
        return "tools" if "tools" in keys or _has_tool_turns(_turns(row)) else "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"data.format: cannot tell the format from the columns {sorted(keys)}; expected alpaca "
        "(instruction/input/output), messages, prompt/completion or text"
    )


def _text(value: Any) -> str:
    """A field's text: a string as it is, a list of content parts as their text parts joined (`_parts`)."""
    if value is None:
        return ""
    if isinstance(value, list):
        text, _, _ = _parts(value)
        return text
    return str(value)


PART_TYPES = ("text", "reasoning", "tool_call")


def _parts(parts: list[Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, reasoning, tool calls) of a message's content given as a list of typed parts: OpenAI's
    `{"type": "text", "text": ...}` or LLaMA-Factory v1's `{"type": "text" | "reasoning" | "tool_call",
    "value": ...}` (plain strings count as text). Text parts join in order, reasoning parts too; a tool_call
    part holds `{"name", "arguments"}` (an object or its JSON). Raises ValueError on any other part."""
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            text.append(part)
            continue
        if not isinstance(part, dict):
            raise ValueError(f"a content part is neither a string nor an object: {part!r:.60}")
        kind = part.get("type", "text")
        body = next((part[k] for k in ("text", "value", kind) if part.get(k) is not None), None)
        if kind == "tool_call":
            calls.extend(parse_calls(body))
        elif kind not in ("text", "reasoning", "thinking"):
            raise ValueError(f"content part type {kind!r} is not supported ({', '.join(PART_TYPES)})")
        elif not isinstance(body, str):
            raise ValueError(f"a {kind} part without a 'text' or 'value' string: {part!r:.80}")
        else:
            (text if kind == "text" else reasoning).append(body)
    return "".join(text), "\n".join(reasoning), calls


def with_reasoning(text: str, reasoning: str) -> str:
    """An assistant turn's reasoning before its answer, as a `<think>` block: the content of a turn with
    reasoning parts, which a chat template with a `reasoning_content` field gets split again (docs/data.md)."""
    return f"<think>\n{reasoning}\n</think>\n\n{text}" if reasoning else text


def _has_text(value: Any) -> bool:
    """Whether a message's content holds any non-blank string, however it is nested."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(_has_text(v) for v in value)
    if isinstance(value, dict):
        return any(_has_text(v) for k, v in value.items() if k != "type")
    return False


# -------------------------------------------------------------------------------------------- messages


def _conversation(row: dict[str, Any]) -> list[Message]:
    raw = _turns(row)
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    msgs: list[Message] = []
    for m in raw:
        if not isinstance(m, dict):
            raise ValueError(f"bad message {m!r:.80}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        text, reasoning, part_calls = _parts(content) if isinstance(content, list) else (None, "", [])
        if role in _ROLES and _ROLES[role] == "assistant" and (reasoning or part_calls):
            msg = {"role": "assistant", "content": with_reasoning(text or "", reasoning)}
            if reasoning:  # raw, for templates.py: a template's reasoning_content, or the block's extent
                msg["reasoning"] = reasoning
            msgs.append({**msg, "tool_calls": part_calls} if part_calls else msg)
        elif role in _CALL_ROLES or (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            calls = parse_calls(content if role in _CALL_ROLES else m.get("tool_calls") or m["function_call"])
            text = "" if role in _CALL_ROLES else _text(content)
            msgs.append({"role": "assistant", "content": text, "tool_calls": calls})
        elif role in _RESULT_ROLES:
            if content is None:
                raise ValueError(f"a tool result without content: {m!r:.80}")
            result = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            msg: Message = {"role": "tool", "content": result}
            msg.update({k: m[k] for k in ("tool_call_id", "name") if m.get(k)})
            msgs.append(msg)
        elif role in _ROLES and content is not None:
            if isinstance(content, dict):
                raise ValueError(
                    f"a {role} message's content is an object, not text or a list of parts: {content!r:.80}"
                )
            msgs.append({"role": _ROLES[role], "content": _text(content) if text is None else text})
        else:
            raise ValueError(f"bad message {m!r:.80}")
        rendered = msgs[-1]
        if not rendered["content"].strip() and not rendered.get("tool_calls") and _has_text(content):
            raise ValueError(
                f"a {rendered['role']} turn renders empty though its source has text: {content!r:.80}"
            )
        if (
            rendered["role"] == "assistant"
            and m.get("loss_weight") is not None
            and not float(m["loss_weight"])
        ):
            rendered["trained"] = False  # LLaMA-Factory v1: loss_weight 0 masks the turn
    return msgs


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
    elif fmt in ("messages", "tools"):
        msgs = _conversation(row)
        system = (_text(row.get("system")).strip() or system_prompt) if msgs[0]["role"] != "system" else None
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _text(row.get("prompt"))}]
        if row.get("completion") is not None:
            msgs.append({"role": "assistant", "content": _text(row["completion"])})
        system = system_prompt
    elif fmt == "text":
        return [{"role": "text", "content": _text(row.get("text"))}]
    elif fmt in ("preference", "kto"):
        raise refuse_preference(preference_kind(row) or fmt, "data")
    else:
        raise DataError(f"data.format: unknown format {fmt!r}")
    return ([{"role": "system", "content": system}] if system else []) + msgs


def reference_answer(messages: list[Message]) -> str | None:
    """The final assistant turn's text (tool calls as `<tool_call>` blocks); None if the last turn is not
    the assistant's."""
    last = messages[-1]
    return assistant_text(last) if last["role"] == "assistant" else None
