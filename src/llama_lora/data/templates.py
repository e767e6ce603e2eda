"""Templates: messages -> `[(text, trained?)]` segments with the chat template or the seed's alpaca layout,
prompts for generation, and the end-of-turn string (and token ids) that closes an assistant turn.

The segments keep track of which text is trained (the assistant's answers and the end-of-turn token that
closes each), so encoding.py can mask the prompt exactly; tool calls are rendered with the template's own
tool support where it has one (tool_calls.plain_tool_messages otherwise), and an assistant turn's reasoning
through the template's `reasoning_content` field where it has one (the `<think>` block formats.py puts in
front of the answer otherwise).
"""

from __future__ import annotations

import re
from typing import Any

from llama_lora.data import formats, tool_calls
from llama_lora.data.formats import (
    Message,
    reference_answer,
)
from llama_lora.errors import DataError

# Strings that close an assistant turn in common chat templates (Llama 3, ChatML/SmolLM2, Phi, Gemma).
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


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


def _template_source(tokenizer) -> str:
    source = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(source, dict):  # named templates, e.g. {"default": ..., "tool_use": ...}
        source = "\n".join(map(str, source.values()))
    return str(source)


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas and tool calls itself: its source refers
    to both `tools` and `tool_calls` (Llama-3.1+, Qwen2.5, Mistral, Hermes do; SmolLM2, Llama-3.0 do not)."""
    source = _template_source(tokenizer)
    return bool(re.search(r"\btools\b", source) and re.search(r"\btool_calls\b", source))


def supports_reasoning(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders an assistant turn's reasoning itself, from the turn's
    `reasoning_content` field (Qwen3 and the DeepSeek-R1 distills do)."""
    return bool(re.search(r"\breasoning_content\b", _template_source(tokenizer)))


def _reasoning_as_field(messages: list[Message]) -> list[Message]:
    """Assistant turns with reasoning as a template with `reasoning_content` takes them: the raw reasoning in
    that field, the content without the `<think>` block formats.py put in front of it."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("reasoning"):
            block = formats.with_reasoning("", m["reasoning"])
            m = {**m, "content": m["content"].removeprefix(block), "reasoning_content": m["reasoning"]}
        out.append(m)
    return out


def for_template(
    messages: list[Message], tools: list[dict[str, Any]] | None, tokenizer, template: str
) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """Messages and tools as the template will take them: unchanged for a chat template with tool support,
    else the plain rendering (`tool_calls.plain_tool_messages`, docs/data.md) and no separate tools."""
    if not tool_calls.uses_tools(messages, tools):
        return messages, None
    if template == "chat" and supports_tools(tokenizer):
        return messages, tools or None
    return tool_calls.plain_tool_messages(messages, tools), None


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


def _content_end(tokenizer, msg: Message, reply: str, answer_at: int) -> tuple[int, str]:
    """Where an assistant turn's content ends in its rendered reply, and the end-of-turn token that follows
    it ('' if none)."""
    if msg.get("tool_calls"):  # the template writes the call its own way: train all it writes
        return _turn_end(tokenizer, reply)
    # the content opens with its <think> block, or follows what the template wrote from reasoning_content
    start = reply.find(msg["content"], answer_at if "reasoning_content" in msg else 0)
    if start == -1:
        raise DataError("data.template: the chat template changes assistant text; use template: alpaca")
    end = start + len(msg["content"])
    return end, _closing_token(tokenizer, reply[end:])


def render_segments(
    messages: list[Message],
    tokenizer,
    template: str,
    tools: list[dict[str, Any]] | None = None,
    train_on_reasoning: bool = True,
) -> list[tuple[str, bool]]:
    """Rendered text as (piece, trainable) segments; trainable = an assistant response and its end token.

    Every response ends with the end-of-turn/EOS token, and that token is trainable, so the model learns
    to stop. Text after it (such as a template's newline) is not. Tool calls are assistant turns and are
    trained; tool results, like system and user turns, are not. `tools` are the conversation's tool schemas.
    Masked turns and, with `train_on_reasoning` False, reasoning (the template's rendering of a
    `reasoning_content` field, or the `<think>` block) are not trained (`_answer`)."""
    eos = tokenizer.eos_token or ""
    if messages and messages[0]["role"] == "text":
        return [(messages[0]["content"] + eos, True)]
    messages, tools = for_template(messages, tools, tokenizer, template)
    if template == "alpaca":
        return _alpaca_segments(messages, eos, train_on_reasoning)
    if supports_reasoning(tokenizer):
        messages = _reasoning_as_field(messages)

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
        answer_at = _answer_at(tokenizer, messages, i, tools, prefix, full)
        content_end, closing = _content_end(tokenizer, msg, reply, answer_at)
        if closing:
            turn = reply[: content_end + len(closing)]
            done = len(prefix) + len(turn)
        else:  # the template does not close the turn: add EOS ourselves so the model learns to stop
            turn = reply[:content_end] + eos
            done = len(prefix) + content_end
            full = full[:done] + eos + full[done:]
            done += len(eos)
        segments += _answer(msg, turn, answer_at, content_end, train_on_reasoning)
    if not segments:  # no assistant message: a prompt for generation
        return [(_apply_chat(tokenizer, messages, True, tools), False)]
    if full[done:]:
        segments.append((full[done:], False))
    return [(text, train) for text, train in segments if text]


def _alpaca_segments(messages: list[Message], eos: str, train_on_reasoning: bool) -> list[tuple[str, bool]]:
    """The alpaca template's segments: one trained response, the last one."""
    answer = reference_answer(messages)
    prompt = alpaca_prompt(messages[:-1] if answer is not None else messages)
    if answer is None:
        return [(prompt, False)]
    cut = _think_end(messages[-1], answer)
    return [(prompt, False), *_answer(messages[-1], answer + eos, cut, len(answer), train_on_reasoning)]


_STAND_IN = "\ue000"  # a private-use character: rendered as the answer, it shows where a template puts it


def _think_end(msg: Message, text: str) -> int:
    """Where the `<think>` block of `msg`'s reasoning (formats.with_reasoning) ends in `text`; 0 if none."""
    block = formats.with_reasoning("", msg.get("reasoning") or "")
    at = text.find(block) if block else -1
    return at + len(block) if at != -1 else 0


def _answer_at(tokenizer, messages: list[Message], i: int, tools, prefix: str, full: str) -> int:
    """Where assistant turn `i`'s answer begins in its reply (`full` after `prefix`), past its reasoning: the
    `<think>` block in its content, or what the template writes from `reasoning_content`, found by rendering
    the turn with a stand-in for its answer (for a template that changes what comes before the answer with
    the answer, the end of the reasoning's text). 0 for a turn without reasoning."""
    msg, reply = messages[i], full[len(prefix) :]
    if "reasoning_content" not in msg:
        return _think_end(msg, reply)
    probe = _apply_chat(tokenizer, [*messages[:i], {**msg, "content": _STAND_IN}], False, tools)
    at = probe.find(_STAND_IN, len(prefix))
    if at != -1 and full.startswith(probe[:at]):
        return at - len(prefix)
    reasoning = msg["reasoning_content"].strip()
    at = reply.find(reasoning)
    return at + len(reasoning) if at != -1 else 0


def _answer(
    msg: Message, turn: str, answer_at: int, content_end: int, train_on_reasoning: bool
) -> list[tuple[str, bool]]:
    """An assistant turn's rendered text (its end-of-turn token included) as segments: trained unless the
    data masks it (`trained: False`, loss_weight 0); with `train_on_reasoning` False, its reasoning (the
    turn's text before `answer_at`, within the first `content_end` characters) shown but not trained."""
    trained = msg.get("trained", True)
    if train_on_reasoning or not 0 < answer_at <= content_end:
        return [(turn, trained)]
    return [(turn[:answer_at], False), (turn[answer_at:], trained)]


def prompt_text(
    messages: list[Message], tokenizer, template: str, tools: list[dict[str, Any]] | None = None
) -> str:
    """The text a model is given at inference: everything before the final assistant response, rendered
    with the conversation's `tools` exactly as training renders them."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return "".join(t for t, _ in render_segments(messages, tokenizer, template, tools))


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS plus the end-of-turn tokens the chat template uses: generation stops at any of them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in END_OF_TURN:
        if token in template:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return sorted(i for i in ids if i is not None)
