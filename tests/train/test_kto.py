"""KTO end to end on the tiny model: every KTO row form trains, its metrics are logged under TRL's names, the
reference is the model as training starts, and undesirable answers are pushed down, not learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, tiny_overrides

THIRD_PARTY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "third_party"


def _kto_rows(n: int = 16) -> list[dict]:
    """TRL's unpaired form: the desirable answers name the number, the undesirable ones refuse."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        answer = f"The number is {i}." if good else "I will not say."
        rows.append({"prompt": f"Say the number {i}.", "completion": answer, "label": good})
    return rows


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kto_trains_and_logs_trl_metrics(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        _write(tmp_path, _kto_rows()),
        out,
        **{"train.objective": "kto", "data.eval_fraction": 0.25, "train.max_steps": 3, "train.eval_steps": 3},
    )
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["objective"] == "kto" and summary["train_examples"] == 12
    assert "KL reference point" not in err  # 4 rows a micro-batch
    records = _metrics(out)
    train = [r for r in records if "loss" in r and "kl" in r]
    assert train, records
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        train[-1]
    )
    assert all(r["kl"] >= 0 for r in train)  # clamped at 0, as TRL does
    evals = [r for r in records if "eval_kl" in r]
    assert evals and "eval_rewards/margins" in evals[-1]
    first_eval = evals[0]
    assert abs(first_eval["eval_rewards/chosen"]) < 1e-6  # before the first step, policy == reference
    assert evals[-1]["eval_rewards/margins"] > first_eval["eval_rewards/margins"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "name, train_examples",
    [("kto_en_demo.json", 16), ("dpo_en_demo.json", 32), ("llamafactory_v1_dpo_demo.jsonl", 20)],
)
def test_kto_trains_on_other_projects_files(tiny_model_dir, tmp_path, name, train_examples):
    """LLaMA-Factory's messages + label rows, and preference pairs unpaired as TRL does (two answers each)."""
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        THIRD_PARTY / name,
        out,
        **{
            "train.objective": "kto",
            "data.max_rows": 16 if name != "llamafactory_v1_dpo_demo.jsonl" else None,
            "data.eval_fraction": 0,
            "data.max_length": 384,
            "train.max_steps": 1,
            "train.batch_size": 2,
        },
    )
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["objective"] == "kto" and summary["train_examples"] == train_examples
    assert "KL reference point per micro-batch, and these hold 2.0 rows" in err  # train.batch_size 2


def test_turbo_alignment_kto_stops_in_one_line(tiny_model_dir, tmp_path):
    """3 of its 4 rows continue a context that already ends on the assistant's turn: refused, named."""
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        THIRD_PARTY / "turbo_alignment_kto.jsonl",
        out,
        **{"train.objective": "kto", "data.eval_fraction": 0},
    )
    code, _, err = cli_in_process("train", *overrides)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "3 of 4 rows are not usable KTO rows" in lines[0] and "must end on a user turn" in lines[0]
    assert not out.exists()


def test_kto_refuses_rows_without_a_label(tiny_model_dir, tmp_path, alpaca_file):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, alpaca_file, out, **{"train.objective": "kto"})
    code, _, err = cli_in_process("train", *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "desirable/undesirable label" in err


def test_kto_rows_are_refused_by_sft_and_dpo(tiny_model_dir, tmp_path):
    """An undesirable answer is never trained as a good one: sft and dpo name the objective to use."""
    data = _write(tmp_path, _kto_rows(8))
    for objective in ("sft", "dpo"):
        out = tmp_path / objective
        code, _, err = cli_in_process(
            "train", *tiny_overrides(tiny_model_dir, data, out, **{"train.objective": objective})
        )
        assert code == 2 and "train.objective: kto" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_compare_on_a_kto_run_reports_the_reward_margin(tiny_model_dir, tmp_path):
    """compare: desirable vs undesirable held-out log-prob margin per side, and KTO's reward margin (beta x
    the adapter's margin minus the base's), positive after training on the same kind of rows."""
    out = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        _write(tmp_path, _kto_rows(24)),
        out,
        **{"train.objective": "kto", "data.eval_fraction": 0.25, "train.max_steps": 6},
    )
    code, _, err = cli_in_process("train", *overrides)
    assert code == 0, err
    code, _, err = cli_in_process("compare", str(out), "--max-new-tokens", "4")
    assert code == 0, err
    result = json.loads((out / "compare.json").read_text())
    for side in (result["base"], result["adapter_metrics"]):
        assert {"desirable_logp", "undesirable_logp", "kto_margin"} <= set(side)
        assert side["kto_margin"] == pytest.approx(side["desirable_logp"] - side["undesirable_logp"])
    margin = result["adapter_metrics"]["kto_margin"] - result["base"]["kto_margin"]
    assert result["kto_reward_margin"] == pytest.approx(0.1 * margin) and margin > 0
    assert all(ex["reference"].startswith("The number is") for ex in result["examples"])  # desirable only
    assert "KTO reward margin" in (out / "report.md").read_text()
