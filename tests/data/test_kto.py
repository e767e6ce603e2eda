"""KTO rows: each form -> (prompt, answer, desirable), and the tokenized examples with their KL sequences."""

from __future__ import annotations

import pytest

from llama_lora.config import DataConfig
from llama_lora.data import formats
from llama_lora.data.encoding import IGNORE
from llama_lora.data.kto import kto_messages, prepare_kto
from llama_lora.errors import DataError


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "row, prompt, answer, desirable",
    [
        ({"prompt": "q", "completion": "a", "label": True}, [user("q")], "a", True),  # TRL, strings
        (  # TRL, conversational
            {"prompt": [user("q")], "completion": [bot("a")], "label": False},
            [user("q")],
            "a",
            False,
        ),
        (  # LLaMA-Factory: the whole conversation, the last turn the answer
            {"messages": [user("q"), bot("x"), user("q2"), bot("a")], "label": True},
            [user("q"), bot("x"), user("q2")],
            "a",
            True,
        ),
        (  # ShareGPT with an older LLaMA-Factory tag
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "kto_tag": False,
            },
            [user("q")],
            "a",
            False,
        ),
        (  # turbo-alignment: role bot, answer one message, is_desirable
            {"context": [user("q")], "answer": {"role": "bot", "content": "a"}, "is_desirable": True},
            [user("q")],
            "a",
            True,
        ),
        (  # typed content parts
            {
                "prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                "completion": "a",
                "label": True,
            },
            [user("q")],
            "a",
            True,
        ),
    ],
)
def test_kto_row_forms(row, prompt, answer, desirable):
    assert formats.preference_kind(row).startswith("KTO")
    [(got_prompt, got_answer, got_desirable)] = kto_messages(row)
    assert got_prompt == prompt and got_answer["content"] == answer and got_desirable is desirable


def test_a_pair_becomes_a_desirable_and_an_undesirable_answer():
    row = {"prompt": "q", "chosen": "good", "rejected": "bad", "system": "be brief"}
    (p1, a1, d1), (p2, a2, d2) = kto_messages(row)
    assert p1 == p2 == [{"role": "system", "content": "be brief"}, user("q")]
    assert (a1["content"], d1, a2["content"], d2) == ("good", True, "bad", False)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "completion": "a"}, "desirable/undesirable label"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "must be true or false"),
        ({"prompt": "q", "completion": "", "label": True}, "empty 'completion'"),
        (
            {
                "context": [user("q"), {"role": "bot", "content": "hi"}],
                "answer": bot("a"),
                "is_desirable": True,
            },
            "must end on a user turn",
        ),
        ({"messages": [user("q")], "label": True}, "must be the assistant's answer, not a user turn"),
        ({"prompt": "q", "label": True}, "no answer"),
    ],
)
def test_unusable_kto_rows_say_why(row, reason):
    with pytest.raises(ValueError, match=reason):
        kto_messages(row)


def _rows(n):
    return [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 != 0} for i in range(n)]


def test_kl_sequences_rotate_the_answers_within_each_block(tokenizer):
    """Row k of a block is paired with the answer of row k - 1 (the first with the block's last), TRL's
    rotation; the KL sequence keeps its own prompt, and only the answer is labelled."""
    examples, stats = prepare_kto(_rows(5), tokenizer, DataConfig(max_length=128), "chat", block=2)
    assert stats.kept == 5 and [e.desirable for e in examples] == [False, True, True, False, True]
    text = [tokenizer.decode(e.kl.input_ids) for e in examples]
    for k, partner in enumerate([1, 0, 3, 2, 4]):  # blocks [0, 1], [2, 3], [4]
        assert f"Question {k}?" in text[k] and f"Answer {partner}." in text[k]
    for e in examples:
        trained = tokenizer.decode(
            [t for t, label in zip(e.example.input_ids, e.example.labels) if label != IGNORE]
        )
        assert trained.startswith("Answer") and "Question" not in trained
        assert e.sides()[0][0] == ("desirable" if e.desirable else "undesirable")


def test_unpaired_rejected_answers_come_after_every_chosen_one(tokenizer):
    """As TRL unpairs a batch: the rotation then never pairs a prompt with its own other answer."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    examples, stats = prepare_kto(rows, tokenizer, DataConfig(max_length=128), "chat", block=8)
    assert [e.desirable for e in examples] == [True] * 3 + [False] * 3 and stats.rows == stats.kept == 6


def test_kto_prompts_are_cut_from_the_left_by_the_one_truncation_policy(tokenizer):
    long = {"prompt": "word " * 200, "completion": "The answer.", "label": True}
    rows = [long, *_rows(3)]
    examples, stats = prepare_kto(rows, tokenizer, DataConfig(max_length=64), "chat", block=4)
    assert stats.kept == 4 and stats.prompts_cut == 1 and "prompts cut from the left" in stats.summary()
    assert all(len(e.example) <= 64 and len(e.kl) <= 64 for e in examples)
    assert tokenizer.decode(examples[0].example.input_ids).rstrip().endswith("The answer.<|im_end|>")
    with pytest.raises(DataError, match="longer than max_length"):
        prepare_kto(rows, tokenizer, DataConfig(max_length=64, truncation="error"), "chat")
    _, dropped = prepare_kto(rows, tokenizer, DataConfig(max_length=64, truncation="drop"), "chat")
    assert dropped.kept == 3 and dropped.dropped_too_long == 1


def test_bad_kto_rows_stop_the_file_or_are_skipped(tokenizer):
    rows = [*_rows(3), {"prompt": "q", "completion": "a"}]
    with pytest.raises(DataError, match=r"1 of 4 rows are not usable KTO rows \(first: row 3: no desirable"):
        prepare_kto(rows, tokenizer, DataConfig(max_length=128), "chat")
    examples, stats = prepare_kto(rows, tokenizer, DataConfig(max_length=128, skip_bad_rows=True), "chat")
    assert len(examples) == 3 and len(stats.bad_rows) == 1
