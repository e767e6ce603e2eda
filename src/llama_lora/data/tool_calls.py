"""Tool schemas and tool calls: reading them from rows (ShareGPT's `tools` JSON string and `function_call`
turns, OpenAI's `tools` list and `tool_calls`), `--tools FILE` for `infer` and `chat`, and the plain rendering
for chat templates without tool support.

A tool call is kept in the form chat templates take, `{"type": "function", "function": {"name", "arguments"}}`
(arguments a dict where they are JSON). A template that renders tools itself gets the messages and schemas
as they are (templates.for_template); any other gets `plain_tool_messages`: the schemas as a `<tools>` block
in the system turn, calls as `<tool_call>` assistant text, results as `<tool_response>` user turns
(docs/data.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama_lora.errors import DataError

Message = dict[str, Any]  # a chat message: `role`, `content`, maybe `tool_calls` and the marks in MARKS


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


def parse_calls(value: Any) -> list[dict[str, Any]]:
    """A turn's tool calls (one call, a list of them, or either as JSON), each as `_call` makes it. Raises
    ValueError on an empty list or a call without a name."""
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


# What a message carries for render_segments besides role and content: `trained` (False: a masked turn) and
# `reasoning` (the raw reasoning of an assistant turn whose content opens with it as a `<think>` block).
MARKS = ("trained", "reasoning")


def _marks(msg: Message) -> Message:
    return {k: msg[k] for k in MARKS if k in msg}


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
            out.append({**_marks(m), "role": "assistant", "content": assistant_text(m)})
        else:
            out.append({**_marks(m), "role": m["role"], "content": m["content"]})
    return [{k: m[k] for k in ("role", "content", *MARKS) if k in m} for m in out]
