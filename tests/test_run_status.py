"""status.json: running with a heartbeat, one final state, and `died` for a run whose process is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llama_lora import run_status
from llama_lora.errors import ConfigError
from tests.conftest import run_in_process, tiny_overrides


def test_recorded_runs_then_finishes(tmp_path):
    with run_status.recorded(tmp_path, total_steps=3) as recorder:
        status = run_status.read(tmp_path)
        assert status["state"] == "running" and status["pid"] == os.getpid() and status["total_steps"] == 3
        recorder.update(total_steps=5)
        assert run_status.read(tmp_path)["total_steps"] == 5
    status = run_status.read(tmp_path)
    assert status["state"] == "finished" and "pid" not in status and status["ended_at"]


def test_a_failure_records_the_error_line_and_an_interrupt_the_last_checkpoint(tmp_path):
    with pytest.raises(ConfigError), run_status.recorded(tmp_path):
        raise ConfigError("train.learning_rate: must be > 0\nsecond line")
    status = run_status.read(tmp_path)
    assert (status["state"], status["error"]) == ("failed", "train.learning_rate: must be > 0")
    with pytest.raises(ValueError), run_status.recorded(tmp_path):
        raise ValueError("bad value")
    assert run_status.read(tmp_path)["error"] == "ValueError: bad value"

    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir()
    with pytest.raises(KeyboardInterrupt), run_status.recorded(tmp_path):
        raise KeyboardInterrupt
    status = run_status.read(tmp_path)
    assert status["state"] == "interrupted" and status["checkpoint"].endswith("checkpoint-4")


def test_a_running_status_whose_process_is_gone_or_silent_reads_as_died(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    status = {"state": "running", "pid": gone.pid, "host": os.uname().nodename, "heartbeat": now}
    (tmp_path / "status.json").write_text(json.dumps(status))
    died = run_status.read(tmp_path)
    assert died["state"] == "died" and "process is gone" in died["error"]

    (tmp_path / "status.json").write_text(json.dumps({**status, "pid": os.getpid()}))
    assert run_status.read(tmp_path)["state"] == "running"
    later = now + run_status.DEAD_AFTER_S + 1
    silent = run_status.read(tmp_path, now=later)
    assert silent["state"] == "died" and "no heartbeat" in silent["error"]
    other_host = {**status, "host": "elsewhere", "pid": 1}  # another machine's pid says nothing here
    (tmp_path / "status.json").write_text(json.dumps(other_host))
    assert run_status.read(tmp_path)["state"] == "running"
    assert run_status.read(tmp_path, now=later)["state"] == "died"


def test_train_records_finished_and_failed_and_runs_lists_them(tmp_model_run):
    root, finished = tmp_model_run
    status = run_status.read(finished)
    assert status["state"] == "finished" and status["total_steps"] == 4
    rows = {r["run"]: r for r in json.loads(run_in_process("runs", str(root), "--json").stdout)}
    assert rows[str(finished)]["status"] == "finished" and rows[str(finished)]["step"] == 4


@pytest.fixture(scope="module")
def tmp_model_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    rows = root / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"instruction": f"n {i}", "output": f"is {i}"}) + "\n" for i in range(16))
    )
    result = run_in_process("train", *tiny_overrides(tiny_model_dir, rows, root / "ok"))
    assert result.returncode == 0, result.stderr
    return root, root / "ok"


def test_a_run_killed_with_sigkill_lists_as_died_and_a_failed_one_with_its_error(
    tmp_model_run, tiny_model_dir
):
    root, _ = tmp_model_run
    rows = root / "rows.jsonl"
    slow = tiny_overrides(tiny_model_dir, rows, root / "killed", **{"train.max_steps": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "train", *slow],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (root / "killed" / "metrics.jsonl").is_file():
            time.sleep(0.5)
        assert run_status.read(root / "killed")["state"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a loss that becomes infinite fails the run after its directory exists
    bad = tiny_overrides(tiny_model_dir, rows, root / "failed", **{"train.learning_rate": 1e30})
    failed = run_in_process("train", *bad)
    assert failed.returncode == 2
    rows_by_run = {r["run"]: r for r in json.loads(run_in_process("runs", str(root), "--json").stdout)}
    assert rows_by_run[str(root / "killed")]["status"] == "died"
    assert rows_by_run[str(root / "failed")]["status"] == "failed"
    assert rows_by_run[str(root / "failed")]["error"] == failed.stderr.strip().splitlines()[-1].removeprefix(
        "error: "
    )
    table = run_in_process("runs", str(root))
    assert "died" in table.stdout and "failed" in table.stdout
