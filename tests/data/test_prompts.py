"""GRPO's prompt-only rows (data/prompts.py): each row form renders to the prompt generation sees, the other
columns reach the rewards, and rows without a prompt (or pairs) are refused in one line."""

from __future__ import annotations

import pytest

from llama_lora.config import DataConfig
from llama_lora.data.prompts import prepare_prompts
from llama_lora.errors import DataError


def _prepare(rows, tokenizer, **data):
    return prepare_prompts(rows, tokenizer, DataConfig(**data), "chat", where="rows")


def _text(example, tokenizer) -> str:
    return tokenizer.decode(example.input_ids)


def test_a_string_prompt_is_one_user_turn_ending_in_the_generation_prompt(tokenizer):
    (ex,), stats = _prepare([{"prompt": "What is 2 + 2?", "answer": "4", "level": 1}], tokenizer)
    text = _text(ex, tokenizer)
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert ex.prompt == "What is 2 + 2?" and ex.columns == {"answer": "4", "level": 1}
    assert stats.kept == 1 and ex.sides()[0][0] == "prompt"
    assert all(label == -100 for label in ex.sides()[0][1].labels)


def test_message_prompts_stay_messages_and_a_final_answer_is_left_out(tokenizer):
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"messages": [{"role": "user", "content": "Sum 1 and 2."}, {"role": "assistant", "content": "3"}]},
        {"instruction": "Double it.", "input": "21", "output": "42"},
    ]
    (a, b, c), _ = _prepare(rows, tokenizer)
    assert a.prompt == rows[0]["prompt"] and "Be brief." in _text(a, tokenizer)
    assert b.prompt == [{"role": "user", "content": "Sum 1 and 2."}]
    assert "3<|im_end|>" not in _text(b, tokenizer) and b.columns["messages"][-1]["content"] == "3"
    assert "Double it.\n\n21" in _text(c, tokenizer) and "42" not in _text(c, tokenizer)


def test_the_system_prompt_opens_a_prompt_without_one(tokenizer):
    (ex,), _ = _prepare([{"prompt": "Hi?"}], tokenizer, system_prompt="You add numbers.")
    assert "<|im_start|>system\nYou add numbers.<|im_end|>" in _text(ex, tokenizer)


@pytest.mark.parametrize(
    "row, why",
    [
        ({"prompt": "", "answer": "1"}, "empty 'prompt'"),
        ({"text": "just text"}, "no prompt"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}][1:]},
            "user turn",
        ),
    ],
)
def test_rows_without_a_usable_prompt_are_bad_rows(tokenizer, row, why):
    with pytest.raises(DataError, match="have no usable prompt") as caught:
        _prepare([row], tokenizer)
    assert why in str(caught.value)
    kept, stats = _prepare([row, {"prompt": "ok?"}], tokenizer, skip_bad_rows=True)
    assert len(kept) == 1 and len(stats.bad_rows) == 1


def test_preference_rows_are_refused(tokenizer):
    with pytest.raises(DataError, match="GRPO needs prompts"):
        _prepare([{"prompt": "p", "chosen": "a", "rejected": "b"}], tokenizer)


def test_a_prompt_longer_than_max_length_is_dropped_or_a_bad_row(tokenizer):
    row = {"prompt": "word " * 200}
    kept, stats = _prepare([row, {"prompt": "short?"}], tokenizer, max_length=64)
    assert len(kept) == 1 and stats.dropped_too_long == 1
    with pytest.raises(DataError, match="longer than max_length"):
        _prepare([row], tokenizer, max_length=64, truncation="error")
