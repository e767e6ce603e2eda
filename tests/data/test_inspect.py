"""`llama-lora data inspect`: trained spans, counts and warnings, on three-line data files."""

from __future__ import annotations

import json
import sys

import pytest
from rich.console import Console

from llama_lora import cli
from llama_lora.config import load_config
from llama_lora.data import dataset, encoding, formats, inspection, pairs, sources
from llama_lora.model import loader
from tests.conftest import cli_in_process, tiny_overrides

END = "<|im_end|>"  # SmolLM2's end-of-turn (and EOS) token


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, source, out, **extra):
    items = {
        "model.name": str(model_dir),
        "data.source": str(source),
        "data.eval_fraction": 0,
        "output.dir": str(out),
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _kinds(report) -> set[str]:
    return {w["kind"] for w in report.warnings}


CHAT_ROWS = [
    {"instruction": "Say the number 3 in words.", "input": "", "output": "The number is three."},
    {"instruction": "Repeat the text.", "input": "hello there", "output": "hello there"},
    {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    },
]


def test_segments_mark_exactly_the_responses_and_their_end_of_turn(tiny_model_dir, tokenizer, tmp_path):
    source = tmp_path / "rows.jsonl"
    _write(source, CHAT_ROWS[:2])
    _write(tmp_path / "chat.jsonl", CHAT_ROWS[2:])
    for path in (source, tmp_path / "chat.jsonl"):
        cfg = _cfg(tiny_model_dir, path, tmp_path / "run")
        report = inspection.inspect(cfg, n=10)
        ds = dataset.load_dataset(cfg, tokenizer)  # what train builds, for comparison
        rows = sources.load_rows(str(path), "train")
        assert len(report.examples) == len(ds.train) == len(rows)
        for record, example, row in zip(report.examples, ds.train, rows, strict=True):
            texts = [s["text"] for s in record["segments"]]
            assert "".join(texts) == tokenizer.decode(example.input_ids, skip_special_tokens=False)
            messages = formats.to_messages(row, formats.detect_format(row))
            responses = [m["content"] for m in messages if m["role"] == "assistant"]
            assert [s["text"] for s in record["segments"] if s["trained"]] == [r + END for r in responses]
            assert record["trained_tokens"] == sum(len(tokenizer(r + END)["input_ids"]) for r in responses)
            assert record["tokens"] == len(example) and record["truncated"] is False
        assert report.template == "chat" and report.warnings == []


def test_the_first_token_is_never_trained_and_runs_alternate(tokenizer):
    ids = tokenizer("Hello world, here we go", add_special_tokens=False)["input_ids"]
    example = encoding.Example(ids, [ids[0], ids[1], encoding.IGNORE, ids[3], ids[4], ids[5]])
    segs = inspection.segments(example, tokenizer)
    assert [t for _, t in segs] == [False, True, False, True]
    assert "".join(t for t, _ in segs) == "Hello world, here we go"
    assert inspection.trained_tokens(example) == 4


def test_counts_rows_kept_skipped_tokens_and_trained_tokens(tiny_model_dir, tokenizer, tmp_path):
    rows = [*CHAT_ROWS[:2], {"instruction": "No answer here."}]  # the last has no response: a bad row
    cfg = _cfg(
        tiny_model_dir,
        _write(tmp_path / "rows.jsonl", rows),
        tmp_path / "run",
        **{"data.skip_bad_rows": "true"},
    )
    report = inspection.inspect(cfg, n=0)
    trained = sum(len(tokenizer(r["output"] + END)["input_ids"]) for r in rows[:2])
    ds = dataset.load_dataset(cfg, tokenizer)
    assert report.examples == []
    assert report.counts["train"] == {
        "rows": 3,
        "kept": 2,
        "skipped": 1,
        "bad_rows": 1,
        "dropped_too_long": 0,
        "dropped_no_labels": 0,
        "truncated": 0,
        "tokens": sum(len(e) for e in ds.train),
        "trained_tokens": trained,
    }
    assert report.counts["eval"]["rows"] == 0


# Under the alpaca template a short row is 12 tokens; data.max_length=16 (its minimum) cuts the others.
SHORT = {"instruction": "Hi", "input": "", "output": "Yes."}
LONG_ANSWER = {"instruction": "Hi", "input": "", "output": "one two three four five six seven eight nine ten"}
LONG_PROMPT = {
    "instruction": "one two three four five six seven eight nine ten eleven",
    "input": "",
    "output": "x",
}
ALPACA = {"data.template": "alpaca", "data.max_length": 16}


def _report(tiny_model_dir, tmp_path, rows, **extra):
    source = _write(tmp_path / "rows.jsonl", rows)
    return inspection.inspect(_cfg(tiny_model_dir, source, tmp_path / "run", **{**ALPACA, **extra}), n=5)


def test_no_warnings_on_rows_that_fit(tiny_model_dir, tmp_path):
    report = _report(tiny_model_dir, tmp_path, [SHORT, SHORT])
    assert report.warnings == [] and report.counts["train"]["truncated"] == 0


def test_a_response_cut_by_max_length_is_flagged(tiny_model_dir, tmp_path):
    report = _report(tiny_model_dir, tmp_path, [SHORT, LONG_ANSWER])
    assert _kinds(report) == {"truncated"}
    assert [r["truncated"] for r in report.examples] == [False, True]
    assert report.examples[1]["tokens"] == 16 and END not in report.examples[1]["segments"][-1]["text"]
    assert report.counts["train"]["truncated"] == 1 and "data.max_length=16" in report.warnings[0]["message"]


def test_an_end_of_turn_never_trained_is_flagged(tiny_model_dir, tmp_path):
    report = _report(tiny_model_dir, tmp_path, [LONG_ANSWER, LONG_ANSWER])
    assert _kinds(report) == {"truncated", "eos_never_trained"}
    assert END in next(w["message"] for w in report.warnings if w["kind"] == "eos_never_trained")


def test_a_long_prompt_loses_its_beginning_and_keeps_its_answer(tiny_model_dir, tmp_path):
    report = _report(tiny_model_dir, tmp_path, [SHORT, LONG_PROMPT])
    assert _kinds(report) == set() and report.counts["train"]["kept"] == 2
    assert report.examples[1]["tokens"] == 16 and report.examples[1]["segments"][-1]["text"].startswith("x")


def test_rows_with_every_label_masked_are_flagged(tiny_model_dir, tmp_path):
    masked = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yes.", "loss_weight": 0},
        ]
    }
    report = _report(tiny_model_dir, tmp_path, [SHORT, masked])
    assert _kinds(report) == {"all_masked"}
    assert report.counts["train"]["dropped_no_labels"] == 1 and report.counts["train"]["kept"] == 1


def test_examples_that_train_next_to_nothing_are_flagged(tiny_model_dir, tmp_path):
    """An empty answer trains only its end-of-turn token: what a file whose turns render empty looks like."""
    empty = {**SHORT, "output": ""}
    report = _report(tiny_model_dir, tmp_path, [SHORT, empty, empty])
    assert _kinds(report) == {"thin"}
    assert (
        "2 examples of 3 train nothing but end-of-turn tokens (first: example 1)"
        in report.warnings[0]["message"]
    )


def test_a_doubled_bos_is_flagged(tiny_model_dir, tokenizer, tmp_path):
    bos = tokenizer.bos_token
    rows = [{"text": f"{bos}{bos}a story"}, {"text": f"{bos}another story"}]
    report = _report(tiny_model_dir, tmp_path, rows, **{"data.max_length": 64})
    assert _kinds(report) == {"double_bos"}
    assert (
        "start of 1 example (" in report.warnings[0]["message"]
        and "example 0" in report.warnings[0]["message"]
    )
    assert _kinds(_report(tiny_model_dir, tmp_path, rows[1:], **{"data.max_length": 64})) == set()


def test_unfilled_placeholders_are_flagged_as_train_logs_them(tiny_model_dir, tmp_path):
    rows = [
        {**SHORT, "instruction": "Hi {{name}}"},
        {**SHORT, "output": "I am {{name}} from {{place}}."},
        SHORT,
    ]
    fits = {"data.max_length": 64}
    report = _report(tiny_model_dir, tmp_path, rows, **fits)
    assert _kinds(report) == {"placeholder"} and len(report.warnings) == 1
    message = report.warnings[0]["message"]
    assert "{{name}} in 2 of 3 rows" in message and "data.fill.name=" in message
    assert "{{place}}" not in message  # in one row only: as in train, not worth a warning
    assert _report(tiny_model_dir, tmp_path, rows, **fits, **{"data.fill.name": "Quokka"}).warnings == []


def test_render_marks_trained_text_with_colour_or_markers():
    record = {
        "index": 0,
        "tokens": 3,
        "trained_tokens": 1,
        "truncated": False,
        "segments": [
            {"text": "Q: ", "trained": False},
            {"text": "A.", "trained": True},
        ],
    }
    assert inspection.render_example(record, color=False).plain == "Q: \u00abA.\u00bb"
    colored = inspection.render_example(record, color=True)
    assert colored.plain == "Q: A." and [str(s.style) for s in colored.spans] == ["dim", "green"]


# ------------------------------------------------------------------------------------------ CLI


def _main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["llama-lora", "data", "inspect", *args])
    monkeypatch.setattr(cli.core, "out", Console(soft_wrap=True, force_terminal=False))  # as in a pipe or log
    cli.main()


def test_cli_json_lines_parse_and_nothing_is_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    source = _write(tmp_path / "rows.jsonl", CHAT_ROWS[:2])
    config = tmp_path / "my.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{source: {source}, eval_fraction: 0}}\n")
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "run"
    _main(monkeypatch, str(config), f"output.dir={out}", "--n", "1", "--json")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["index"] == 0
    assert {s["trained"] for s in lines[0]["segments"]} == {True, False}
    assert lines[0]["segments"][1] == {"text": "The number is three." + END, "trained": True}
    assert lines[1]["summary"]["train"]["kept"] == 2 and lines[1]["warnings"] == []
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before

    _main(monkeypatch, str(config), f"output.dir={out}", "--n", "2")
    text = capsys.readouterr().out
    assert "\u00abThe number is three." + END + "\u00bb" in text and "\u00abhello there" in text
    assert "train: 2 rows, 2 kept, 0 skipped" in text and "no warnings" in text
    assert not out.exists()


def test_cli_bad_config_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(monkeypatch, "data.max_length=3", f"output.dir={tmp_path / 'run'}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.max_length" in err
    assert not (tmp_path / "run").exists()


def test_gguf_tokenizer_without_conversion_writes_nothing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LORA_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [])
    loaded = loader.load_tokenizer(cfg.model, loader.resolve(cfg.model.name), convert=False)
    assert not (tmp_path / "cache").exists()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Héllo 日本"}], tokenize=False)
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.eos_token == tokenizer.eos_token


PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue, as the sky.", "rejected": "I will not."},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
]


def test_cli_json_shows_both_sides_of_each_pair_under_dpo(tiny_model_dir, tmp_path):
    source = _write(tmp_path / "pairs.jsonl", PAIRS)
    overrides = tiny_overrides(
        tiny_model_dir, source, tmp_path / "run", **{"train.objective": "dpo", "data.eval_fraction": 0}
    )
    code, out, err = cli_in_process("data", "inspect", *overrides, "--n", "2", "--json")
    assert code == 0, err
    assert "Traceback" not in out + err
    *records, summary = [json.loads(line) for line in out.splitlines()]
    assert [(r["index"], r["side"]) for r in records] == [
        (0, "chosen"),
        (0, "rejected"),
        (1, "chosen"),
        (1, "rejected"),
    ]
    for record, pair in zip(
        records, [side for p in PAIRS for side in (p["chosen"], p["rejected"])], strict=True
    ):
        assert [s["text"] for s in record["segments"] if s["trained"]] == [pair + END]
        assert record["truncated"] is False
    chosen, rejected = records[0], records[1]
    assert chosen["segments"][0] == rejected["segments"][0]  # the same prompt, untrained
    train = summary["summary"]["train"]
    assert train["kept"] == 2 and train["trained_tokens"] == sum(r["trained_tokens"] for r in records)
    assert train["tokens"] == sum(r["tokens"] for r in records) and summary["warnings"] == []


def test_pair_sides_are_named_in_the_terminal(tiny_model_dir, tmp_path):
    source = _write(tmp_path / "pairs.jsonl", [{**PAIRS[0], "rejected": ""}, PAIRS[1]])
    overrides = tiny_overrides(
        tiny_model_dir,
        source,
        tmp_path / "run",
        **{"train.objective": "dpo", "data.eval_fraction": 0, "data.skip_bad_rows": "true"},
    )
    code, out, err = cli_in_process("data", "inspect", *overrides, "--n", "1")
    assert code == 0, err
    assert "── example 0 (chosen):" in out and "── example 0 (rejected):" in out
    assert "\u00abHi there!" + END + "\u00bb" in out and "\u00abNo." + END + "\u00bb" in out
    assert "train: 2 rows, 1 kept, 1 skipped (1 bad)" in out and "Traceback" not in out + err


def test_warnings_look_at_every_side_and_name_it(tokenizer):
    ids = tokenizer("Q: hi A: yes", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids(END)
    good = encoding.Example([*ids, end], [encoding.IGNORE] * 3 + [*ids[3:], end])
    thin = encoding.Example([*ids[:3], end], [encoding.IGNORE] * 3 + [end])  # only its end-of-turn token
    pair = pairs.PairExample(good, thin)
    warnings = inspection.split_warnings("train", [pair, pair], encoding.PrepareStats(rows=2), tokenizer, 64)
    assert [w["kind"] for w in warnings] == ["thin"]
    assert "2 example sides of 4 train nothing" in warnings[0]["message"]
    assert "(first: example 0 (rejected))" in warnings[0]["message"]
    assert inspection.eos_warning([pairs.PairExample(thin, thin)], tokenizer) is None
    assert inspection.counts(2, [pair], encoding.PrepareStats(rows=2))["trained_tokens"] == (
        inspection.trained_tokens(good) + inspection.trained_tokens(thin)
    )
