"""Reliability: resume after a kill, atomic saves, one-line errors for bad input, no secrets or pickles.

Each test is a row of docs/failures.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_lora import checkpoint, run_dir
from llama_lora.config import load_config
from llama_lora.train import train

from .conftest import run_cli, tiny_overrides

RESUME = {
    "train.max_steps": 12,
    "train.save_steps": 3,
    "train.save_total_limit": 2,
    "train.batch_size": 2,
    "peft.lora_dropout": 0.1,  # dropout draws random numbers: resuming must restore the generator
    "peft.use_dora": True,
}


def start_training(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "train", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def adapter_max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and x
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def metric_steps(run: Path) -> list[int]:
    return [r["step"] for r in run_dir.read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("whole")
    rows = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
        for i in range(24)
    ]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(load_config(overrides=tiny_overrides(tiny_model_dir, data, root / "run", **RESUME)), quiet=True)
    return root


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, uninterrupted / "rows.jsonl", out, **RESUME)
    proc = start_training(*args)
    wait_for(out / "checkpoints" / "checkpoint-6", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists() and proc.returncode == -signal.SIGKILL

    resumed = run_cli("train", "--quiet", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    diff = adapter_max_diff(out / "adapter", uninterrupted / "run" / "adapter")
    print(f"resume max abs diff: {diff:.3g}")
    assert diff <= 1e-6
    assert metric_steps(out) == list(range(1, 13))  # continuous, no duplicates
    summary = json.loads((out / "train_summary.json").read_text())
    whole = json.loads((uninterrupted / "run" / "train_summary.json").read_text())
    for key in ("train_tokens", "train_loss", "eval_loss", "eval_loss_before", "epochs"):
        assert summary[key] == pytest.approx(whole[key], abs=1e-6), key


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, uninterrupted):
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_model_dir, uninterrupted / "rows.jsonl", out, **{**RESUME, "train.save_steps": 100}
    )
    proc = start_training(*args)
    wait_for(out / "metrics.jsonl", proc)
    while len(metric_steps(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    saved = run_dir.checkpoint_dirs(out)
    assert len(saved) == 1 and checkpoint.is_complete(saved[0])
    step = run_dir.checkpoint_step(saved[0])
    assert f"step {step}" in stderr and step == metric_steps(out)[-1]

    resumed = run_cli("train", "--quiet", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert adapter_max_diff(out / "adapter", uninterrupted / "run" / "adapter") <= 1e-6
    assert metric_steps(out) == list(range(1, 13))
