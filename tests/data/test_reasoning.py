"""Reasoning parts: rendered through a chat template's own `reasoning_content` field where it has one, else
as the `<think>` block; `data.train_on_reasoning: false` shows the reasoning but trains only the answer."""

from __future__ import annotations

import copy

import pytest

from llama_lora.config import DataConfig
from llama_lora.data import encoding, formats, templates
from tests.data.test_formats import V1_ROW, WEATHER

END = "<|im_end|>"
# In the spirit of Qwen3's template: reasoning_content inside <think> tags before the answer (Qwen3's own
# drops it from turns before the last user turn; this one always writes it), tool calls after the content.
REASONING_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.reasoning_content %}<think>\n{{ m.reasoning_content.strip('\\n') }}\n</think>\n\n{% endif %}"
    "{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% if loop.first and m.content %}\n{% endif %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONING = "Two and two make 4."  # holds the answer's text: the answer is found after it, not inside it
ROW = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {
            "role": "assistant",
            "content": [{"type": "reasoning", "value": REASONING}, {"type": "text", "value": "4."}],
        },
    ]
}


def _trained(segments):
    return [t for t, train in segments if train]


def _masked(segments):
    return "".join(t for t, train in segments if not train)


@pytest.fixture
def reasoning_tokenizer(tokenizer):
    native = copy.deepcopy(tokenizer)
    native.chat_template = REASONING_TEMPLATE
    return native


def test_a_template_with_reasoning_content_renders_the_reasoning_itself(reasoning_tokenizer, monkeypatch):
    seen = []
    apply = reasoning_tokenizer.apply_chat_template
    monkeypatch.setattr(
        reasoning_tokenizer,
        "apply_chat_template",
        lambda messages, **kw: seen.append(messages) or apply(messages, **kw),
    )
    msgs = formats.to_messages(ROW, "messages")
    segments = templates.render_segments(msgs, reasoning_tokenizer, "chat")
    text = "".join(t for t, _ in segments)
    expected = apply(
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": REASONING},
        ],
        tokenize=False,
    )
    assert text == expected  # the template's own rendering of the field
    assert text.count(REASONING) == 1 and text.count("<think>") == 1  # not doubled by the fallback block
    given = [m[-1] for m in seen if m[-1]["role"] == "assistant" and m[-1]["content"] == "4."]
    assert given and all(m["reasoning_content"] == REASONING for m in given)  # the answer alone as content
    assert _trained(segments) == [f"<think>\n{REASONING}\n</think>\n\n4.{END}"]


def test_train_on_reasoning_false_leaves_the_templates_reasoning_untrained(reasoning_tokenizer):
    msgs = formats.to_messages(ROW, "messages")
    shown = templates.render_segments(msgs, reasoning_tokenizer, "chat")
    hidden = templates.render_segments(msgs, reasoning_tokenizer, "chat", train_on_reasoning=False)
    assert "".join(t for t, _ in shown) == "".join(t for t, _ in hidden)
    assert _trained(hidden) == ["4." + END]
    assert f"<think>\n{REASONING}\n</think>\n\n" in _masked(hidden)
    (example,), _ = encoding.prepare([ROW], reasoning_tokenizer, DataConfig(train_on_reasoning=False), "chat")
    trained_ids = [i for i, label in zip(example.input_ids, example.labels) if label != encoding.IGNORE]
    assert reasoning_tokenizer.decode(trained_ids) == "4." + END


def test_reasoning_before_a_tool_call_is_untrained_and_the_call_trained(reasoning_tokenizer):
    msgs = formats.to_messages(V1_ROW, "tools")
    tools = [{"type": "function", "function": WEATHER}]
    hidden = templates.render_segments(msgs, reasoning_tokenizer, "chat", tools, train_on_reasoning=False)
    text = "".join(t for t, _ in hidden)
    assert text.count("The user wants the weather") == 1 and "<think>\nThe user wants" in text
    call = next(t for t in _trained(hidden) if "get_weather" in t)
    assert (
        call.startswith("<tool_call>") and call.endswith(END) and "The user wants" not in _trained(hidden)[0]
    )
    assert "The user wants the weather; call the tool.\n</think>\n\n" in _masked(hidden)
    assert "21 degrees." + END in _trained(hidden) and not any("Draft." in t for t in _trained(hidden))


def test_a_template_without_reasoning_content_gets_the_think_block(tokenizer):
    assert not templates.supports_reasoning(tokenizer)
    msgs = formats.to_messages(ROW, "messages")
    block = f"<think>\n{REASONING}\n</think>\n\n"
    segments = templates.render_segments(msgs, tokenizer, "chat")
    assert _trained(segments) == [f"{block}4.{END}"]
    assert "".join(t for t, _ in segments).count(REASONING) == 1
    hidden = templates.render_segments(msgs, tokenizer, "chat", train_on_reasoning=False)
    assert _trained(hidden) == ["4." + END] and f"assistant\n{block}" in _masked(hidden)
