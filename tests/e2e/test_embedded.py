"""The real embedded SmolLM2-135M-Instruct trains for a few steps (slow, but part of make test)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_embedded_smollm2_trains_a_few_dora_steps(tmp_path, smollm2_dir):
    out = tmp_path / "smol"
    result = run_cli(
        "train",
        "--preset",
        "demo",
        "--quiet",
        "train.max_steps=3",
        "train.eval_steps=null",
        "train.save_steps=null",
        "data.max_rows=24",
        "data.eval_split=eval[:16]",
        "train.learning_rate=1e-3",
        f"output.dir={out}",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and summary["method"] == "dora"
    assert summary["steps"] == 3 and summary["train_tokens"] > 0
    assert summary["eval_loss"] < summary["eval_loss_before"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000
