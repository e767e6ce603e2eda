"""Preference pairs (DPO/ORPO data): row forms -> messages, and the two tokenized sides with only the final
response trained and the prompt's token ids shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_lora.config import DataConfig
from llama_lora.data import formats
from llama_lora.data.encoding import IGNORE
from llama_lora.data.pairs import PairExample, pair_messages, prepare_pairs
from llama_lora.errors import DataError

DPO_DEMO = Path(__file__).resolve().parents[3] / "shared/data/third_party/dpo_en_demo.json"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SHAREGPT_2_TURNS = {
    "conversations": [
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Another one?"},
    ],
    "chosen": {"from": "gpt", "value": "Green is another colour."},
    "rejected": {"from": "gpt", "value": "No."},
}


@pytest.mark.parametrize(
    "row, prompt, chosen, rejected",
    [
        ({"prompt": "q", "chosen": "good", "rejected": "bad"}, [user("q")], "good", "bad"),
        (  # TRL explicit prompt, conversational
            {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
            [user("q")],
            "good",
            "bad",
        ),
        ({"prompt": [user("q")], "chosen": bot("good"), "rejected": "bad"}, [user("q")], "good", "bad"),
        (  # TRL implicit prompt: the common leading messages
            {
                "chosen": [user("q"), bot("a"), user("q2"), bot("good")],
                "rejected": [user("q"), bot("a"), user("q2"), bot("bad")],
            },
            [user("q"), bot("a"), user("q2")],
            "good",
            "bad",
        ),
        (  # LLaMA-Factory ShareGPT with a system turn
            {
                "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
            [system("Be brief."), user("q")],
            "good",
            "bad",
        ),
        (
            {**SHAREGPT_2_TURNS, "system": "Be kind."},
            [system("Be kind."), user("Name a colour."), bot("Blue."), user("Another one?")],
            "Green is another colour.",
            "No.",
        ),
        (  # OpenAI messages and content parts
            {
                "messages": [user("q")],
                "chosen": {"role": "assistant", "content": [{"type": "text", "text": "good"}]},
                "rejected": "bad",
            },
            [user("q")],
            "good",
            "bad",
        ),
    ],
)
def test_row_forms_give_prompt_chosen_and_rejected(row, prompt, chosen, rejected):
    assert pair_messages(row) == (prompt, bot(chosen), bot(rejected))


def _v1(*turns):
    return [
        {"role": r, "content": [{"type": "text", "value": t}], "loss_weight": float(r == "assistant")}
        for r, t in turns
    ]


OTHER_PROJECTS = [  # (row, prompt, chosen, rejected): three-line inputs in each project's own form
    (  # LLaMA-Factory v1: whole conversations on each side, typed parts, loss_weight per message
        {
            "chosen_messages": _v1(("system", "Be brief."), ("user", "q"), ("assistant", "good")),
            "rejected_messages": _v1(("system", "Be brief."), ("user", "q"), ("assistant", " bad")),
        },
        [system("Be brief."), user("q")],
        "good",
        " bad",
    ),
    (  # OpenAI's preference fine-tuning format
        {
            "input": {"messages": [user("q")], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [bot("good")],
            "non_preferred_output": [bot("bad")],
        },
        [user("q")],
        "good",
        "bad",
    ),
    (  # Anthropic HH-RLHF: two whole transcripts, no prompt; tags count only after a blank line
        {
            "chosen": "\n\nHuman: Hi Assistant: there\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
            "rejected": "\n\nHuman: Hi Assistant: there\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: No.",
        },
        [user("Hi Assistant: there"), bot("Hello."), user("Name a colour.")],
        "Blue.",
        "No.",
    ),
]


@pytest.mark.parametrize("row, prompt, chosen, rejected", OTHER_PROJECTS)
def test_other_projects_pair_forms(row, prompt, chosen, rejected):
    assert pair_messages(row) == (prompt, bot(chosen), bot(rejected))
    assert formats.preference_kind(row) is not None  # sft refuses them, pointing to dpo


@pytest.mark.parametrize(
    "row, reason",
    [
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant:"},
            "no 'rejected'",
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
            "differ before",
        ),
        (
            {
                "chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more",
                "rejected": "\n\nHuman: q\n\nAssistant: b",
            },
            "does not end on an Assistant",
        ),
        (
            {"input": {}, "preferred_output": [bot("a")], "non_preferred_output": [bot("b")]},
            "no 'input.messages'",
        ),
    ],
)
def test_bad_pairs_of_other_projects_forms_say_why(row, reason):
    with pytest.raises(ValueError, match=reason):
        pair_messages(row)


def test_system_prompt_fills_in_only_where_the_row_has_none():
    row = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert pair_messages(row, "Sys.")[0] == [system("Sys."), user("q")]
    assert pair_messages({**row, "system": "Own."}, "Sys.")[0] == [system("Own."), user("q")]
    convo = {"prompt": [system("Own."), user("q")], "chosen": "good", "rejected": "bad"}
    assert pair_messages(convo, "Sys.")[0] == [system("Own."), user("q")]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "good"}, "no 'rejected' response"),
        ({"prompt": "q", "chosen": "", "rejected": "bad"}, "no 'chosen' response"),
        ({"prompt": "q", "chosen": "  ", "rejected": "bad"}, "empty 'chosen' response"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        (
            {"prompt": [user("q"), bot("a")], "chosen": "good", "rejected": "bad"},
            "must end on a user turn, not assistant",
        ),
        ({"prompt": "q", "chosen": [user("x")], "rejected": "bad"}, "only assistant turns"),
        ({"chosen": "good", "rejected": "bad"}, "no prompt"),
        (
            {"chosen": [user("q"), bot("good")], "rejected": [user("other"), bot("bad")]},
            "differ only in their final",
        ),
        ({"instruction": "q", "output": "a"}, "not a preference pair"),
    ],
)
def test_bad_rows_raise_a_short_reason(row, reason):
    with pytest.raises(ValueError, match=reason):
        pair_messages(row)


def trained_ids(ex):
    return [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE]


def test_multi_turn_pair_trains_only_the_final_response(tokenizer):
    (pair,), stats = prepare_pairs([SHAREGPT_2_TURNS], tokenizer, DataConfig(max_length=256), "chat")
    assert (
        stats.kept == stats.rows == 1
        and not stats.bad_rows
        and len(pair) == len(pair.chosen) + len(pair.rejected)
    )
    assert pair.ref_chosen is None and pair.ref_rejected is None
    starts = [
        next(i for i, label in enumerate(ex.labels) if label != IGNORE) for ex in (pair.chosen, pair.rejected)
    ]
    assert starts[0] == starts[1]
    assert pair.chosen.input_ids[: starts[0]] == pair.rejected.input_ids[: starts[1]]
    prompt = tokenizer.decode(pair.chosen.input_ids[: starts[0]])
    assert "Blue." in prompt and prompt.endswith("<|im_start|>assistant\n")  # the earlier answer is context
    for ex, answer in ((pair.chosen, "Green is another colour."), (pair.rejected, "No.")):
        assert all(label == IGNORE for label in ex.labels[: starts[0]])
        assert tokenizer.decode(trained_ids(ex)) == answer + "<|im_end|>"


def test_long_responses_are_cut_at_their_tails(tokenizer):
    row = {"prompt": "q", "chosen": "word " * 100, "rejected": "short"}
    (pair,), stats = prepare_pairs([row], tokenizer, DataConfig(max_length=48), "chat")
    assert len(pair.chosen) == 48 and len(pair.rejected) < 48
    assert stats.truncated == 1 and stats.truncated_examples == [0]
    _, stats = prepare_pairs([row], tokenizer, DataConfig(max_length=48, truncation="drop"), "chat")
    assert stats.kept == 0 and stats.dropped_too_long == 1


def _prompt(ex):
    return ex.input_ids[: next(i for i, label in enumerate(ex.labels) if label != IGNORE)]


def test_dpo_demo_prompts_too_long_are_cut_from_the_left_and_every_pair_kept(tokenizer):
    """LLaMA-Factory's dpo_en_demo.json at max_length 384: 124 of its 300 rows used to be refused; now each
    long prompt loses its beginning (its end, next to the answers, is kept) and every pair trains."""
    rows = json.loads(DPO_DEMO.read_text())
    pairs, stats = prepare_pairs(rows, tokenizer, DataConfig(max_length=384), "chat", where="dpo")
    assert stats.rows == stats.kept == len(pairs) == 300 and not stats.bad_rows
    assert stats.prompts_cut > 100 and "prompts cut from the left" in stats.summary()
    assert all(len(p.chosen) <= 384 and len(p.rejected) <= 384 for p in pairs)
    assert all(trained_ids(p.chosen) and trained_ids(p.rejected) for p in pairs)
    whole, _ = prepare_pairs(rows, tokenizer, DataConfig(max_length=100_000), "chat")
    cut = [(p, w) for p, w in zip(pairs, whole) if len(_prompt(p.chosen)) < len(_prompt(w.chosen))]
    assert len(cut) == stats.prompts_cut
    for p, w in cut:  # the end of the prompt kept, both sides alike, at least half of max_length
        kept = _prompt(p.chosen)
        assert kept == _prompt(w.chosen)[-len(kept) :] == _prompt(p.rejected) and len(kept) >= 192
    with pytest.raises(DataError, match=r"^dpo: \d+ of 300 rows .*tokens, longer than max_length 384"):
        prepare_pairs(rows, tokenizer, DataConfig(max_length=384, truncation="error"), "chat", where="dpo")


def test_bad_rows_stop_in_one_line_unless_skipped(tokenizer):
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "good"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "word " * 100, "chosen": "good", "rejected": "bad"},
        {"instruction": "q", "output": "a"},
    ]
    with pytest.raises(DataError) as caught:
        prepare_pairs(rows, tokenizer, DataConfig(max_length=64), "chat", where="prefs.json")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("prefs.json: 3 of 5 rows")
    assert "first: row 1: no 'rejected' response" in message and "skip_bad_rows" in message
    pairs, stats = prepare_pairs(rows, tokenizer, DataConfig(max_length=64, skip_bad_rows=True), "chat")
    assert len(pairs) == stats.kept == 2 and stats.rows == 5 and stats.prompts_cut == 1  # row 3: prompt cut
    assert [b.split(":")[0] for b in stats.bad_rows] == ["row 1", "row 2", "row 4"]
    assert all(isinstance(p, PairExample) and len(p.chosen) <= 64 for p in pairs)
    strict = DataConfig(max_length=64, skip_bad_rows=True, truncation="error")  # the long prompt refused
    assert "row 3: " in prepare_pairs(rows, tokenizer, strict, "chat")[1].bad_rows[2]


def test_kto_rows_are_refused_in_one_line(tokenizer):
    rows = [{"messages": [user("q"), bot("a")], "label": False}]
    for dcfg in (DataConfig(), DataConfig(skip_bad_rows=True)):
        with pytest.raises(DataError, match="train it with train.objective: kto") as caught:
            prepare_pairs(rows, tokenizer, dcfg, "chat", where="kto.json")
        assert "\n" not in str(caught.value) and "kto.json: row 0" in str(caught.value)
