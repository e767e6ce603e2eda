"""Preference tuning through the trainer: `train.objective: dpo | orpo`, `model.adapter` starts, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import cli_in_process, tiny_overrides


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(model_dir, data, out, **extra) -> None:
    settings = {"train.eval_steps": None, "data.eval_fraction": 0.2, **extra}
    code, _, err = cli_in_process("train", "--quiet", *tiny_overrides(model_dir, data, out, **settings))
    assert code == 0, err


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_dpo_starts_at_log_2_and_logs_rewards(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    _train(tiny_model_dir, pairs_file, out, **{"train.objective": "dpo", "train.learning_rate": 5e-3})
    records = _records(out)
    first = next(r for r in records if "loss" in r)
    # the reference is the model as training starts, so the first step's policy equals it: margin 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert key in first
    before = records[0]
    assert before["step"] == 0 and before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    after = records[-1]
    assert "eval_rewards/accuracies" in after and after["eval_loss"] < before["eval_loss"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["train_examples"] == 16


def test_dpo_trains_on_each_other_projects_pair_form(tiny_model_dir, tmp_path):
    """LLaMA-Factory v1, OpenAI's preference format and HH-RLHF rows (tests/data/test_pairs.py) train."""
    from tests.data.test_pairs import OTHER_PROJECTS

    for i, (row, *_) in enumerate(OTHER_PROJECTS):
        data = tmp_path / f"pairs{i}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for _ in range(10)))
        out = tmp_path / f"run{i}"
        _train(tiny_model_dir, data, out, **{"train.objective": "dpo", "train.max_steps": 2})
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["objective"] == "dpo" and summary["train_examples"] == 8, row


def test_orpo_trains_without_a_reference(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "orpo"
    _train(tiny_model_dir, pairs_file, out, **{"train.objective": "orpo"})
    records = _records(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[0] > 1.0  # the chosen NLL dominates at first
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]


def test_dpo_resume_equals_the_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    extra = {"train.objective": "dpo", "train.save_steps": 2, "train.learning_rate": 5e-3}
    _train(tiny_model_dir, pairs_file, out, **extra)
    whole = _adapter(out)
    code, _, err = cli_in_process(
        "train", "--quiet", *tiny_overrides(tiny_model_dir, pairs_file, out, **{"train.eval_steps": None,
        "data.eval_fraction": 0.2, **extra}), "--resume", "checkpoint-2",
    )  # fmt: skip
    assert code == 0, err
    again = _adapter(out)
    assert max(float((whole[k] - again[k]).abs().max()) for k in whole) <= 1e-6


def test_dpo_from_an_sft_adapter_uses_it_as_reference_and_start(
    tiny_model_dir, pairs_file, tmp_path, alpaca_file
):
    sft = tmp_path / "sft"
    _train(tiny_model_dir, alpaca_file, sft, **{"peft.r": 2, "peft.lora_alpha": 4})
    out = tmp_path / "dpo"
    _train(tiny_model_dir, pairs_file, out, **{"train.objective": "dpo", "model.adapter": str(sft)})
    first = next(r for r in _records(out) if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # reference = the SFT adapter = start
    config = (out / "config.yaml").read_text()
    assert "r: 2" in config and "lora_alpha: 4" in config  # the continued adapter's shape
    start, trained = _adapter(sft), _adapter(out)
    assert set(start) == set(trained)
    assert max(float((start[k] - trained[k]).abs().max()) for k in start) > 0


def test_model_adapter_errors_are_one_line(tiny_model_dir, pairs_file, tmp_path, alpaca_file):
    code, _, err = cli_in_process(
        "train",
        *tiny_overrides(tiny_model_dir, pairs_file, tmp_path / "x", **{"model.adapter": str(tmp_path)}),
    )
    assert code == 2 and "model.adapter" in err and "not a run directory" in err
    assert not (tmp_path / "x").exists()


def test_preference_rows_under_sft_point_to_the_objective(tiny_model_dir, pairs_file, tmp_path):
    code, _, err = cli_in_process("train", *tiny_overrides(tiny_model_dir, pairs_file, tmp_path / "x"))
    assert code == 2 and "train.objective: dpo" in err and len(err.strip().splitlines()) == 1, err


def test_compare_on_a_preference_run_reports_preference_accuracy(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    _train(tiny_model_dir, pairs_file, out, **{"train.objective": "dpo", "train.learning_rate": 5e-3})
    code, stdout, err = cli_in_process("compare", str(out), "--n", "4", "--max-new-tokens", "4")
    assert code == 0, err
    result = json.loads((out / "compare.json").read_text())
    for side in (result["base"], result["adapter_metrics"]):
        assert 0.0 <= side["preference_accuracy"] <= 1.0 and "preference_margin" in side
    assert result["n"] == 4 and result["examples"][0]["reference"].endswith(".")  # the chosen answer
    # trained towards the chosen answers: the adapter's margin beats the base's
    assert result["adapter_metrics"]["preference_margin"] > result["base"]["preference_margin"]
    assert "preference accuracy" in (out / "report.md").read_text() and "preference accuracy" in stdout
