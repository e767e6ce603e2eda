"""Row formats: tell a row's format, turn the row into chat messages, read tool schemas and tool calls,
find and fill `{{name}}` placeholders.

Formats (`data.format`): `alpaca`, `messages` (OpenAI `role/content` or ShareGPT `from/value`), `tools`
(messages with tool calls: ShareGPT `function_call`/`observation` turns with a `tools` JSON string, or
OpenAI assistant `tool_calls` and `tool` messages with a `tools` list), `prompt_completion` and `text`.
Preference pairs (`chosen`/`rejected`) and KTO rows (a boolean `label`) are recognised only to be refused:
trained as plain messages they would teach the rejected and undesirable answers too.

Messages are dicts with `role` and `content`; an assistant message may also hold `tool_calls`
(`[{"type": "function", "function": {"name", "arguments": {...}}}]`, the form chat templates take), and
a tool result is `{"role": "tool", "content": ...}`. Templates without tool support get the plain
rendering of `plain_tool_messages` instead (docs/data.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llama_lora.errors import DataError

Message = dict[str, Any]

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
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
    if {"chosen", "rejected"} <= keys:
        if "conversations" in keys or "messages" in keys:
            return "preference pairs (ShareGPT: conversations + chosen/rejected)"
        if isinstance(row["chosen"], list):
            return "preference pairs (chosen/rejected message lists)"
        return "preference pairs (prompt/chosen/rejected)"
    if isinstance(row.get("label"), bool) or isinstance(row.get("kto_tag"), bool):
        return "KTO data (messages with a boolean desirable/undesirable label)"
    return None


def refuse_preference(kind: str, where: str, index: int | None = None) -> DataError:
    at = f" (row {index})" if index is not None else ""
    if kind.startswith("KTO"):
        return DataError(
            f"{where}: the rows are {kind}{at}; KTO training is not available yet in llama-lora "
            "(train.objective dpo/orpo take chosen/rejected pairs; sft, one good response a row)"
        )
    return DataError(
        f"{where}: the rows are {kind}{at}; train them with train.objective: dpo (or orpo), "
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
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in value)
    return str(value)


# ---------------------------------------------------------------------------------------------- tools


def _json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg})") from None


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """Tool schemas in OpenAI's form (`{"type": "function", "function": {...}}`) from a list of them,
    a list of bare function schemas (`{"name", "description", "parameters"}`) or either as a JSON string
    (ShareGPT's `tools` field). None, "" and "[]" are no tools. Raises ValueError on anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    value = _json(_json(value, "'tools'"), "'tools'")  # some exports encode the string twice
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"'tools' must be a list of function schemas, got {type(value).__name__}")
    tools = []
    for tool in value:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tools.append({"type": tool.get("type", "function"), "function": tool["function"]})
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            tools.append({"type": "function", "function": tool})
        else:
            raise ValueError(f"'tools' holds something that is not a function schema: {tool!r:.80}")
    return tools


def load_tools(path: str) -> list[dict[str, Any]]:
    """Tool schemas for `infer`/`chat --tools FILE`: a JSON list of OpenAI function schemas (or bare
    `{name, description, parameters}` ones), or that list as a JSON string (ShareGPT's `tools` field)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--tools: {path} not found")
    try:
        tools = parse_tools(p.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"--tools: {path}: {exc}") from None
    if not tools:
        raise DataError(f"--tools: {path} holds no tool schemas")
    return tools


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]]:
    return parse_tools(row.get("tools"))


def _call(raw: Any) -> dict[str, Any]:
    """One tool call, OpenAI's (`{"id", "type", "function": {"name", "arguments": "<json>"}}`) or
    ShareGPT's (`{"name", "arguments": {...}}`), as `{"type": "function", "function": {name, arguments}}`
    with the arguments as a dict where they are JSON."""
    fn = raw.get("function", raw) if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"a tool call needs a name: {raw!r:.80}")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the string: the model is trained on what the data says
    call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(raw, dict) and raw.get("id"):
        call["id"] = raw["id"]
    return call


def _calls(value: Any) -> list[dict[str, Any]]:
    value = _json(value, "a function_call")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise ValueError("an empty function_call")
    return [_call(c) for c in calls]


def call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    payload = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def assistant_text(msg: Message) -> str:
    """What an assistant turn says, its tool calls written as `<tool_call>` blocks (the plain rendering)."""
    parts = [msg["content"]] if msg.get("content") else []
    return "\n".join(parts + [call_text(c) for c in msg.get("tool_calls") or []])


TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)


def uses_tools(messages: list[Message], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def plain_tool_messages(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """The tool conversation for a template without tool support, as system/user/assistant text only:
    the schemas join the system message (`<tools>` block, Hermes/Qwen style), a call is assistant text
    holding `<tool_call>{"name": ..., "arguments": ...}</tool_call>`, and tool results become one user turn
    of `<tool_response>` blocks (consecutive results share it, so user and assistant still alternate)."""
    out: list[Message] = []
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_result"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_result": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": assistant_text(m)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


# ---------------------------------------------------------------------------------------- placeholders


PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def placeholders(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Template placeholders such as `{{name}}` left in the rows: name -> number of rows holding it."""
    counts: dict[str, int] = {}
    for row in rows:
        for name in {m for s in _strings(row) for m in PLACEHOLDER.findall(s)}:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def fill_placeholders(row: Any, fill: dict[str, str]) -> Any:
    """`row` with every `{{name}}` named in `fill` replaced by its value (other placeholders kept)."""
    if not fill:
        return row
    if isinstance(row, str):
        return PLACEHOLDER.sub(lambda m: fill.get(m.group(1), m.group(0)), row)
    if isinstance(row, dict):
        return {k: fill_placeholders(v, fill) for k, v in row.items()}
    if isinstance(row, list):
        return [fill_placeholders(v, fill) for v in row]
    return row


def placeholder_warnings(rows: list[dict[str, Any]], fill: dict[str, str], where: str) -> list[str]:
    """Warnings for `{{name}}` placeholders that `data.fill` leaves in many rows (at least 2 and 5%),
    and for `data.fill` names that no row holds."""
    found = placeholders(rows)
    least = max(2, len(rows) // 20)
    left = {name: n for name, n in found.items() if name not in fill and n >= least}
    warnings = []
    if left:
        counts = ", ".join(f"{{{{{name}}}}} in {n} of {len(rows)} rows" for name, n in left.items())
        keys = " ".join(f"data.fill.{name}=..." for name in left)
        warnings.append(
            f"warning: {where}: placeholders left in the rows ({counts}) would be trained as written; "
            f"fill them with {keys}"
        )
    unused = [name for name in fill if name not in found]
    if unused:
        names = ", ".join(f"{{{{{name}}}}}" for name in unused)
        warnings.append(f"warning: data.fill: no row of {where} holds {names}")
    return warnings


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
        if role in _CALL_ROLES or (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            calls = (
                _calls(content) if role in _CALL_ROLES else _calls(m.get("tool_calls") or m["function_call"])
            )
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
            msgs.append({"role": _ROLES[role], "content": _text(content)})
        else:
            raise ValueError(f"bad message {m!r:.80}")
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
