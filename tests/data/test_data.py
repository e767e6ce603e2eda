"""Pure data functions: formats, templates, label masking, truncation."""

from __future__ import annotations

import json

import pytest

from llama_lora.config import DataConfig
from llama_lora.data import encoding, formats, sources, templates
from llama_lora.errors import DataError

IGNORE = encoding.IGNORE


def test_detect_format():
    assert formats.detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert formats.detect_format({"messages": []}) == "messages"
    assert formats.detect_format({"conversations": []}) == "messages"
    assert formats.detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert formats.detect_format({"text": "a"}) == "text"
    with pytest.raises(DataError, match="cannot tell the format"):
        formats.detect_format({"question": "a"})


def test_alpaca_to_messages_joins_input_and_keeps_system():
    msgs = formats.to_messages(
        {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief."}, "alpaca"
    )
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum\n\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_sharegpt_and_openai_messages_agree():
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert formats.to_messages(openai, "messages") == formats.to_messages(sharegpt, "messages")


def test_prompt_completion_and_text():
    assert formats.to_messages({"prompt": "p", "completion": "c"}, "prompt_completion")[-1] == {
        "role": "assistant",
        "content": "c",
    }
    assert formats.to_messages({"text": "plain"}, "text") == [{"role": "text", "content": "plain"}]


def test_alpaca_template_is_the_seeds_layout_and_drops_empty_input():
    with_input = formats.to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca")
    assert (
        templates.alpaca_prompt(with_input[:-1]) == "### Instruction:\nSum\n### Input:\n1 2\n### Response:\n"
    )
    no_input = formats.to_messages({"instruction": "Sum", "input": "", "output": "3"}, "alpaca")
    assert templates.alpaca_prompt(no_input[:-1]) == "### Instruction:\nSum\n### Response:\n"
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert templates.alpaca_prompt(history) == (
        "### Instruction:\na\n### Response:\nb\n### Instruction:\nc\n### Response:\n"
    )


def test_alpaca_segments_end_with_eos(tokenizer):
    msgs = formats.to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca")
    segs = templates.render_segments(msgs, tokenizer, "alpaca")
    assert segs == [("### Instruction:\nHi\n### Response:\n", False), ("Hello" + tokenizer.eos_token, True)]


def test_chat_segments_train_the_response_and_end_of_turn_only(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    segs = templates.render_segments(msgs, tokenizer, "chat")
    trained = "".join(t for t, train in segs if train)
    assert trained == "Hello there<|im_end|>"
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert "".join(t for t, _ in segs) == full  # segmenting loses nothing
    assert not segs[-1][1] and segs[-1][0] == "\n"  # the template's trailing newline is not trained


def test_multi_turn_chat_trains_every_assistant_turn(tokenizer):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    segs = templates.render_segments(msgs, tokenizer, "chat")
    assert [t for t, train in segs if train] == ["b<|im_end|>", "d<|im_end|>"]


def test_labels_are_masked_exactly_on_the_prompt_and_eos_is_learned(tokenizer):
    msgs = formats.to_messages({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "alpaca")
    segs = templates.render_segments(msgs, tokenizer, "chat")
    ex = encoding.tokenize(segs, tokenizer)
    prompt_ids = tokenizer(templates.prompt_text(msgs, tokenizer, "chat"), add_special_tokens=False)[
        "input_ids"
    ]
    n_prompt = len(prompt_ids)
    assert ex.input_ids[:n_prompt] == prompt_ids  # training sees the same prompt ids as inference
    assert all(label == IGNORE for label in ex.labels[:n_prompt])
    response = [label for label in ex.labels[n_prompt:] if label != IGNORE]
    assert response[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert tokenizer.decode(response) == "Blue.<|im_end|>"


def test_eos_is_learned_even_when_pad_equals_eos(tokenizer):
    from llama_lora.data.batching import collate, pad_id_for

    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 ships this way: the classic trap
    short = encoding.tokenize([("Q", False), ("A" + tokenizer.eos_token, True)], tokenizer)
    long = encoding.tokenize(
        [("Question here", False), ("Longer answer" + tokenizer.eos_token, True)], tokenizer
    )
    batch = collate([short, long], pad_id_for(tokenizer))
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == IGNORE).all()  # padding is never trained
    for row, ex in enumerate([short, long]):
        assert labels[row, len(ex) - 1] == tokenizer.eos_token_id  # the closing EOS is


def test_train_on_prompt_labels_everything(tokenizer):
    ex = encoding.tokenize([("Q", False), ("A" + tokenizer.eos_token, True)], tokenizer, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_text_format_trains_all_tokens(tokenizer):
    segs = templates.render_segments([{"role": "text", "content": "just text"}], tokenizer, "chat")
    assert segs == [("just text" + tokenizer.eos_token, True)]


def test_prepare_truncates_or_drops_and_counts(tokenizer):
    rows = [
        {"instruction": "x " * 200, "input": "", "output": "y"},
        {"instruction": "hi", "input": "", "output": "ok"},
    ]
    kept, stats = encoding.prepare(
        rows, tokenizer, DataConfig(max_length=64, truncation="truncate"), "alpaca"
    )
    # the long row's prompt loses its beginning, so its answer still fits and trains
    assert (stats.prompts_cut, stats.truncated, stats.dropped_no_labels, stats.kept) == (1, 0, 0, 2)
    long = kept[0]
    assert len(long) == 64 and tokenizer.decode(
        [i for i, label in zip(long.input_ids, long.labels) if label != -100]
    ).startswith("y")
    assert "1 prompts cut from the left" in stats.summary()
    kept, stats = encoding.prepare(rows, tokenizer, DataConfig(max_length=64, truncation="drop"), "alpaca")
    assert (stats.dropped_too_long, stats.kept) == (1, 1)
    assert len(kept[0]) <= 64


def test_prepare_names_the_bad_row(tokenizer):
    rows = [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"instruction": "", "input": "", "output": "x"},
    ]
    with pytest.raises(DataError, match="row 1"):
        encoding.prepare(rows, tokenizer, DataConfig(), "alpaca", where="f.jsonl")


def test_load_rows_local_files_and_split_expressions(tmp_path):
    rows = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(10)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(sources.load_rows(str(jsonl), "train")) == 10
    assert len(sources.load_rows(str(jsonl), "train[:30%]")) == 3
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\na,,b\nc,,d\n")
    assert sources.load_rows(str(csv), "train")[1]["output"] == "d"


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match="line 2"):
        sources.load_rows(str(bad), "train")


def test_missing_file_and_missing_split_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        sources.load_rows(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(DataError, match="no split 'test'"):
        sources.load_rows("demo", "test")


def test_bundled_demo_data_and_probe():
    import re

    train, held = sources.load_rows("demo", "train"), sources.load_rows("demo", "eval")
    assert len(train) >= 200 and len(held) >= 20
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    probe = sources.load_probe("demo")
    assert all(re.match(probe["pattern"], r["output"]) for r in train + held)


def test_txt_is_a_document_a_line(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"first document\r\n\r\nsecond one\r\n   \nthird\n")
    rows = sources.load_rows(str(txt), "train")
    assert rows == [{"text": "first document"}, {"text": "second one"}, {"text": "third"}]
    assert formats.detect_format(rows[0]) == "text"
    assert len(sources.load_rows(str(txt), "train[:2]")) == 2  # split expressions as for every file


def test_json_object_is_one_record_or_holds_one_list_of_records(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('{"instruction": "a", "input": "", "output": "b"}')
    assert sources.load_rows(str(one), "train") == [{"instruction": "a", "input": "", "output": "b"}]
    holder = tmp_path / "holder.json"
    holder.write_text('{"version": 2, "data": [{"text": "x"}, {"text": "y"}], "tags": ["t"]}')
    assert sources.load_rows(str(holder), "train") == [{"text": "x"}, {"text": "y"}]
    two = tmp_path / "two.json"
    two.write_text('{"a": [{"text": "x"}], "b": [{"text": "y"}]}')
    with pytest.raises(DataError, match="neither a record nor holds exactly one list"):
        sources.load_rows(str(two), "train")


def test_bom_and_crlf_are_read_in_json_jsonl_and_csv(tmp_path):
    bom = b"\xef\xbb\xbf"
    files = {
        "a.json": bom + b'[{"instruction": "i", "input": "", "output": "o"}]\r\n',
        "a.jsonl": bom + b'{"instruction": "i", "input": "", "output": "o"}\r\n\r\n',
        "a.csv": bom + b"instruction,input,output\r\ni,,o\r\n",
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        rows = sources.load_rows(str(tmp_path / name), "train")
        assert len(rows) == 1 and rows[0]["instruction"] == "i" and rows[0]["output"] == "o", name


def test_unknown_file_type_and_unexpected_read_errors_are_one_line(tmp_path, monkeypatch):
    md = tmp_path / "notes.md"
    md.write_text("# notes\n")
    with pytest.raises(DataError, match="cannot read .md files"):
        sources.load_rows(str(md), "train")
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "x"}\n')

    def boom(path):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(sources, "_read_local", boom)
    with pytest.raises(DataError, match=r"ok.jsonl: could not read the rows \(RuntimeError: disk on fire\)$"):
        sources.load_rows(str(ok), "train")


def test_unexpected_error_while_rendering_names_the_row(tokenizer, monkeypatch):
    rows = [{"text": "fine"}, {"text": "also fine"}]

    def boom(segments, tokenizer, train_on_prompt=False):
        if "also" in segments[0][0]:
            raise RuntimeError("tokenizer exploded")
        return encoding.Example([1, 2], [1, 2])

    monkeypatch.setattr(encoding, "tokenize", boom)
    with pytest.raises(
        DataError, match=r"f.txt: row 1: cannot be tokenized \(RuntimeError: tokenizer exploded\)"
    ):
        encoding.prepare(rows, tokenizer, DataConfig(), "chat", where="f.txt")
