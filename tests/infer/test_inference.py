"""infer / merge / compare on tiny trained runs: merged == adapter, streaming == plain, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from llama_lora.config import load_config
from llama_lora.data import encoding, formats, templates
from llama_lora.infer import generate, loading
from llama_lora.train.loop import train
from tests.conftest import run_cli, run_in_process, tiny_overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One tiny LoRA run and one tiny DoRA run (alpaca template for one, chat for the other)."""
    root = tmp_path_factory.mktemp("runs")
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(1, i + 2))}
        for i in range(30)
    ]
    source = root / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = {}
    for method, template in (("lora", "alpaca"), ("dora", "chat")):
        out = root / method
        cfg = load_config(
            overrides=tiny_overrides(
                tiny_model_dir,
                source,
                out,
                **{
                    "peft.use_dora": method == "dora",
                    "data.template": template,
                    "train.max_steps": 8,
                    "train.learning_rate": 5e-3,
                },
            )
        )
        train(cfg, quiet=True)
        made[method] = out
    return made


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_equals_adapter_and_loads_in_plain_transformers(runs, tmp_path, tokenizer, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    result = run_cli("merge", str(runs[method]), "--out", str(merged_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert (
        report["passed"] and report["max_abs_logit_diff"] <= 1e-3 and report["greedy_token_agreement"] == 1.0
    )
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (merged_dir / name).is_file(), name
    assert not list(merged_dir.parent.glob(".merged.tmp-*"))

    cfg = load_config(runs[method] / "config.yaml")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()  # no PEFT, no llama-lora
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(runs[method] / "adapter")).eval()
    ids = tokenizer("### Instruction:\nCount to 3.\n### Response:\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
        a = merged.generate(ids, max_new_tokens=12, do_sample=False)
        b = unmerged.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(a[0]) == tokenizer.decode(b[0])


def test_infer_adapter_and_merged_give_the_same_tokens(runs, tmp_path):
    merged_dir = tmp_path / "m"
    assert run_in_process("merge", str(runs["dora"]), "--out", str(merged_dir)).returncode == 0
    settings = generate.GenerationSettings(max_new_tokens=10)
    messages = [{"role": "user", "content": "Count to 4."}]
    unmerged = loading.load(adapter=str(runs["dora"]), device="cpu", merge_in_memory=False)
    folded = loading.load(adapter=str(runs["dora"]), device="cpu")  # what `infer --adapter` uses
    merged = loading.load(base=str(merged_dir), device="cpu")
    assert merged.template == unmerged.template == "chat"  # the merged dir remembers its template
    reference = generate.generate(unmerged, messages, settings).token_ids
    assert reference
    assert generate.generate(folded, messages, settings).token_ids == reference
    assert generate.generate(merged, messages, settings).token_ids == reference
    common = ["Count to 4.", "--max-new-tokens", "10"]
    via_adapter = run_in_process("infer", "--adapter", str(runs["dora"]), *common)
    via_merged = run_in_process("infer", "--base", str(merged_dir), *common)
    assert via_adapter.returncode == 0 and via_merged.returncode == 0, via_adapter.stderr + via_merged.stderr
    assert via_adapter.stdout == via_merged.stdout


def test_stream_equals_plain_greedy_output(runs):
    args = ["infer", "--adapter", str(runs["lora"]), "Count to 5.", "--max-new-tokens", "16"]
    plain, streamed = run_in_process(*args), run_in_process(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout


@pytest.mark.parametrize("method, template", [("lora", "alpaca"), ("dora", "chat")])
def test_inference_prompt_equals_training_prompt(runs, method, template):
    loaded = loading.load(adapter=str(runs[method]), device="cpu")
    assert loaded.template == template
    row = {"instruction": "Count to 2.", "input": "", "output": "1 2 3"}
    messages = formats.to_messages(row, "alpaca")
    trained = encoding.tokenize(
        templates.render_segments(messages, loaded.tokenizer, template), loaded.tokenizer
    )
    n_prompt = next(i for i, label in enumerate(trained.labels) if label != encoding.IGNORE)
    assert generate.render_prompt(loaded, messages[:-1]) == trained.input_ids[:n_prompt]


def test_prompts_file_writes_jsonl(runs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"instruction": "Count to 1.", "input": "", "output": "1 2"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Count to 2."}]})
        + "\n"
    )
    out = tmp_path / "gen.jsonl"
    result = run_cli(
        "infer",
        "--adapter",
        str(runs["lora"]),
        "--prompts-file",
        str(prompts),
        "-o",
        str(out),
        "--max-new-tokens",
        "5",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["Count to 1.", "Count to 2."]
    assert lines[0]["reference"] == "1 2" and "generation" in lines[1]


def test_inference_errors_are_clear(runs, tmp_path, smollm2_dir):
    missing = run_in_process("infer", "--adapter", str(tmp_path / "nope"), "hi")
    assert missing.returncode == 2 and "adapter" in missing.stderr and "Traceback" not in missing.stderr
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("{not json\n")
    unreadable = run_in_process("infer", "--adapter", str(runs["lora"]), "--prompts-file", str(bad_file))
    assert unreadable.returncode == 2 and "line 1" in unreadable.stderr
    other_base = run_in_process("infer", "--adapter", str(runs["lora"]), "--base", str(smollm2_dir), "hi")
    assert other_base.returncode == 2 and "different base model" in other_base.stderr
    precision = run_in_process("infer", "--adapter", str(runs["lora"]), "--precision", "fp16", "hi")
    assert precision.returncode == 2 and precision.stderr.strip().count("\n") == 0, precision.stderr
    assert "--precision: 'fp16' is not one of auto, bf16, fp32" in precision.stderr
    assert "Traceback" not in unreadable.stderr + other_base.stderr


def test_compare_writes_reports(runs, tmp_path):
    result = run_in_process("compare", str(runs["lora"]), "--n", "3", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads((runs["lora"] / "compare.json").read_text())
    for side in ("base", "adapter_metrics"):
        assert {"eval_loss", "perplexity", "rouge_l", "mean_generated_tokens", "stop_rate"} <= set(
            report[side]
        )
    assert report["adapter_metrics"]["eval_loss"] < report["base"]["eval_loss"]
    assert len(report["examples"]) == report["n"] == 3
    html = (runs["lora"] / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "http" not in html.replace("http-equiv", "")
    assert "| eval loss" in (runs["lora"] / "report.md").read_text()


def test_chat_keeps_history_and_obeys_reset_and_exit(runs):
    import os
    import subprocess
    import sys

    session = "Count to 2.\nAnd now to 3?\n/reset\nCount to 1.\n/exit\nnever read\n"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_lora",
            "chat",
            "--adapter",
            str(runs["lora"]),
            "--greedy",
            "--max-new-tokens",
            "4",
        ],
        input=session,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3
    assert "(history cleared)" in result.stderr


def test_merge_over_tolerance_fails_and_writes_no_model(runs, tmp_path, monkeypatch):
    from llama_lora.export import merge

    monkeypatch.setitem(merge.TOLERANCE, "float32", -1.0)  # nothing can pass
    target = tmp_path / "merged"
    with pytest.raises(merge.MergeError, match="merge check failed"):
        merge.merge(str(runs["lora"]), out=target, log=lambda *a: None)
    assert not target.exists() and not list(tmp_path.glob(".merged.tmp-*"))
    assert json.loads((tmp_path / "merged.merge_report.json").read_text())["passed"] is False


def test_compare_eval_loss_equals_the_runs_own(runs, tmp_path, tiny_model_dir):
    """compare batches the held-out rows as training did, so its two losses are the run's eval_loss (adapter)
    and eval_loss_before (base, as the adapter starts as the identity)."""
    from llama_lora.evaluate import compare

    out = tmp_path / "run"
    source = load_config(runs["dora"] / "config.yaml").data.source
    overrides = tiny_overrides(
        tiny_model_dir,
        source,
        out,
        **{"peft.use_dora": True, "data.eval_fraction": 0.3, "train.batch_size": 3, "train.max_steps": 3},
    )
    summary = train(load_config(overrides=overrides), quiet=True).summary
    result = compare.compare(str(out), n=100, max_new_tokens=1, device="cpu", log=lambda *a: None)
    assert result["n"] == 9  # every held-out row, in batches of 3
    # float32 throughout; what differs is rounding: compare folds the adapter into the weights, training did not
    assert result["adapter_metrics"]["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert result["base"]["eval_loss"] == pytest.approx(summary["eval_loss_before"], rel=1e-6)


def test_greedy_probe_equals_generate(runs):
    """merge's probes: the prompt's logits are the model's, and the tokens what greedy `generate` returns."""
    loaded = loading.load(adapter=str(runs["dora"]), device="cpu", merge_in_memory=False)
    messages = [{"role": "user", "content": "Count to 4."}]
    ids = generate.render_prompt(loaded, messages)
    logits, tokens = generate.greedy_probe(loaded.model, [ids], 12, loaded.stop_ids)
    expected = generate.generate(loaded, messages, generate.GenerationSettings(max_new_tokens=12))
    assert tokens == [expected.token_ids]
    with torch.no_grad():
        assert torch.equal(logits[0], loaded.model(input_ids=torch.tensor([ids])).logits[0])
    _, unstopped = generate.greedy_probe(loaded.model, [ids], 12)  # export's: every position, no stopping
    assert len(unstopped[0]) == 12 and unstopped[0][: len(tokens[0])] == tokens[0]


def test_prompts_file_rows_generate_in_chunks_as_each_would_alone(runs):
    """Rows go through the engine a chunk at a time (here 2 rows a chunk, 5 rows): every line, in row order,
    has the text `generate` gives that row alone (greedy, float32)."""
    import io

    from llama_lora.infer import frontends

    loaded = loading.load(adapter=str(runs["lora"]), device="cpu", log=lambda *a: None)
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}, then stop."}]} for i in range(5)]
    settings = generate.GenerationSettings(max_new_tokens=8)
    sink = io.StringIO()
    assert frontends.generate_rows(loaded, rows, settings, sink, where="test", chunk=2) == 5
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    alone = [generate.generate(loaded, r["messages"], settings).text for r in rows]
    assert [line["generation"] for line in lines] == alone
    assert [line["prompt"] for line in lines] == [r["messages"][0]["content"] for r in rows]


def test_bf16_generation_makes_its_decoder_once(runs):
    loaded = loading.load(adapter=str(runs["lora"]), device="cpu", log=lambda *a: None, precision="bf16")
    settings = generate.GenerationSettings(max_new_tokens=6)
    first = generate.generate(loaded, [{"role": "user", "content": "Hi"}], settings)
    decoder = loaded.decoder
    again = generate.generate(loaded, [{"role": "user", "content": "Hi"}], settings)
    assert decoder is not None and loaded.decoder is decoder and again.token_ids == first.token_ids
