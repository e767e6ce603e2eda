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

from llama_lora import run_dir
from llama_lora.config import load_config
from llama_lora.train import checkpoint
from llama_lora.train.loop import train
from tests.conftest import run_cli, tiny_overrides

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


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `llama-lora ARGS` in this process (the CLI's real error handling); returns (exit status, stderr)."""
    from llama_lora import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["llama-lora", *args])
    capsys.readouterr()
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


# ------------------------------------------------------------------------------ crash and resume


def test_resume_without_a_checkpoint_is_refused(tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stderr = cli(
        monkeypatch, capsys, "train", "--resume", *tiny_overrides(tiny_model_dir, alpaca_file, out)
    )
    assert_one_line_error(code, stderr, "--resume", "no checkpoint")
    assert not out.exists()


def test_resume_with_changed_settings_is_refused(tiny_model_dir, uninterrupted, monkeypatch, capsys):
    run = uninterrupted / "run"
    before = (run / "metrics.jsonl").read_text()
    changed = {**RESUME, "train.learning_rate": 5e-4}
    args = tiny_overrides(tiny_model_dir, uninterrupted / "rows.jsonl", run, **changed)
    code, stderr = cli(monkeypatch, capsys, "train", *args, "--resume")
    assert_one_line_error(code, stderr, "train.learning_rate")
    code, stderr = cli(monkeypatch, capsys, "train", "--resume=checkpoint-4", *args[:-1], f"output.dir={run}")
    assert_one_line_error(code, stderr, "checkpoint-4")
    assert (run / "metrics.jsonl").read_text() == before


# ----------------------------------------------------------------------------- nothing half-written


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(
    tmp_path, tiny_model_dir, uninterrupted, monkeypatch
):
    """A save that dies half-way leaves checkpoint-3 as it was; a leftover temporary directory (what SIGKILL
    leaves) is never taken for a checkpoint, and resuming from checkpoint-3 still ends where it should."""
    out = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(tiny_model_dir, uninterrupted / "rows.jsonl", out, **RESUME))
    real_save_file = checkpoint.save_file

    def dies_in_checkpoint_6(tensors, filename):
        if "checkpoint-6" in filename and filename.endswith("rng.safetensors"):
            raise OSError("No space left on device (simulated)")
        return real_save_file(tensors, filename)

    monkeypatch.setattr(checkpoint, "save_file", dies_in_checkpoint_6)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, quiet=True)
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-3"]
    assert not (out / "adapter").exists()
    leftover = out / "checkpoints" / ".checkpoint-6.tmp-killed"
    (leftover / "adapter").mkdir(parents=True)
    (leftover / "trainer_state.json").write_text('{"step": 6')  # torn
    assert checkpoint.find(out) == out / "checkpoints" / "checkpoint-3"

    train(cfg, quiet=True, resume="latest")
    assert adapter_max_diff(out / "adapter", uninterrupted / "run" / "adapter") <= 1e-6
    assert metric_steps(out) == list(range(1, 13))


def test_kill_inside_atomic_dir_keeps_the_previous_directory(tmp_path):
    """adapter/, checkpoints and merged models are written through run_dir.atomic_dir: SIGKILL mid-write
    leaves the previous version in place."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("good")
    script = (
        "import sys, time, pathlib\n"
        "from llama_lora import run_dir\n"
        "with run_dir.atomic_dir(pathlib.Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'adapter_model.safetensors').write_text('half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target / "adapter_model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".adapter.tmp-")] == ["adapter"]


# ------------------------------------------------------------------------------------- bad input


def test_missing_data_file_exits_2(tmp_path, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stderr = cli(
        monkeypatch, capsys, "train", *tiny_overrides(tiny_model_dir, tmp_path / "nope.jsonl", out)
    )
    assert_one_line_error(code, stderr, "nope.jsonl", "not found")
    assert not out.exists()


def test_unreadable_data_file_exits_2(tmp_path, tiny_model_dir, monkeypatch, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')  # not UTF-8
    out = tmp_path / "run"
    code, stderr = cli(monkeypatch, capsys, "train", *tiny_overrides(tiny_model_dir, bad, out))
    assert_one_line_error(code, stderr, "latin1.jsonl", "cannot read")
    assert not out.exists()


def test_empty_data_file_exits_2(tmp_path, tiny_model_dir, monkeypatch, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    code, stderr = cli(monkeypatch, capsys, "train", *tiny_overrides(tiny_model_dir, empty, out))
    assert_one_line_error(code, stderr, "empty.jsonl", "empty")
    assert not out.exists()


def test_malformed_jsonl_exits_2_naming_the_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    out = tmp_path / "run"
    code, stderr = cli(monkeypatch, capsys, "train", *tiny_overrides(tiny_model_dir, bad, out))
    assert_one_line_error(code, stderr, "bad.jsonl", "line 2")
    assert not out.exists()


def test_rows_missing_fields_are_counted_or_skipped(
    tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys
):
    rows = alpaca_file.read_text().splitlines()
    rows[3] = json.dumps({"instruction": "no output here"})
    rows[7] = json.dumps({"input": "no instruction", "output": "x"})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, mixed, out, **{"data.eval_fraction": 0.0, "train.max_steps": 1})
    code, stderr = cli(monkeypatch, capsys, "train", *args)
    assert_one_line_error(code, stderr, "mixed.jsonl", "2 of 32 rows", "row 3", "data.skip_bad_rows")
    assert not out.exists()
    code, stderr = cli(monkeypatch, capsys, "train", *args, "data.skip_bad_rows=true")
    assert code == 0, stderr
    assert "skipped 2 bad rows (first: row 3" in stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_examples"] == 30 and summary["skipped_bad_rows"] == 2


def test_dataset_empty_after_filtering_exits_2(tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys):
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_model_dir, alpaca_file, out, **{"data.max_length": 16, "data.truncation": "drop"}
    )
    code, stderr = cli(monkeypatch, capsys, "train", *args)
    assert_one_line_error(code, stderr, "rows.jsonl", "no training rows left", "data.max_length")
    assert not out.exists()


def test_every_label_masked_refuses_to_train(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every assistant turn masked (loss_weight 0): nothing could be learned."""
    import json

    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yes.", "loss_weight": 0},
        ]
    }
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "run"
    code, stderr = cli(monkeypatch, capsys, "train", *tiny_overrides(tiny_model_dir, data, out))
    assert_one_line_error(
        code, stderr, "rows.jsonl", "every label would be masked", "no response tokens left"
    )
    assert not out.exists()


def test_prompt_longer_than_context_exits_2(tiny_model_dir, monkeypatch, capsys):
    code, stderr = cli(monkeypatch, capsys, "infer", "--base", str(tiny_model_dir), "word " * 3000)
    assert_one_line_error(code, stderr, "longer than the model's context of 2048")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys
):
    from llama_lora.train.objectives import sft

    class NanFromStep6(sft.ResponseLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            total, n = super().forward(*args, **kwargs)
            if self.training:
                NanFromStep6.calls += 1
                if NanFromStep6.calls >= 6:
                    total = total * float("nan")
            return total, n

    monkeypatch.setattr(sft, "ResponseLoss", NanFromStep6)  # the objective builds one
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, alpaca_file, out, **{"train.max_steps": 8, "train.save_steps": 2})
    code, stderr = cli(monkeypatch, capsys, "train", "--quiet", *args)
    assert_one_line_error(code, stderr, "nan at step 6", "checkpoint-4")
    assert checkpoint.find(out) == out / "checkpoints" / "checkpoint-4"
    assert not (out / "adapter").exists()
    state = load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


# ---------------------------------------------------------------------------------------- security


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    from llama_lora.config import ModelConfig
    from llama_lora.errors import ModelError
    from llama_lora.infer import loading
    from llama_lora.model import loader

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, pickled)
    state = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ModelError, match="model.allow_pickle"):
        loader.load_model(ModelConfig(name=str(pickled)), torch.float32)
    assert loader.load_model(ModelConfig(name=str(pickled), allow_pickle=True), torch.float32) is not None

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match="--adapter.*pickled"):
        loading.load(adapter=str(adapter), device="cpu")


def test_remote_code_and_pickles_are_off_by_default(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llama_lora.config import Config
    from llama_lora.model import loader

    seen = {}

    def spy(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = Config().model.model_copy(update={"name": str(tiny_model_dir)})
    with pytest.raises(RuntimeError, match="stop here"):
        loader.load_model(cfg, torch.float32)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
    assert Config().model.trust_remote_code is False and Config().model.allow_pickle is False


def test_run_dir_has_no_token_and_no_pickles(tmp_path, tiny_model_dir, alpaca_file, monkeypatch):
    """With a hub token in the environment, nothing under the run directory (config, logs, metrics, reports,
    checkpoints, adapter, merged model) contains it, and every weight file written is safetensors."""
    from llama_lora.export.merge import merge

    token = "hf_SECRETTEST1234567890abcdefXYZ"
    env = {"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token}
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, alpaca_file, out, **{"train.save_steps": 2})
    result = run_cli("train", *args, env=env)
    assert result.returncode == 0, result.stderr
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    merge(str(out), device="cpu", log=lambda *a: None)
    (out / "train.log").write_text(result.stdout + result.stderr)  # what the user saw, scanned too

    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.safetensors" for p in files) and (out / "merged").is_dir()
    for path in files:
        content = path.read_bytes()
        assert token.encode() not in content, path
        assert path.suffix not in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}, path
        assert not content.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04")), path


def test_failure_table_names_real_tests():
    """docs/failures.md: one test per row, and every test it names exists."""
    import re

    root = Path(__file__).resolve().parents[2]
    lines = (root / "docs" / "failures.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| failure", "| ---"))]
    named = [re.search(r"`((?:\w+/)*test_\w+\.py)::(test_\w+)`", row) for row in rows]
    assert named and all(named), "every row names its test"
    for match in named:
        source = (root / "tests" / match.group(1)).read_text()
        assert f"def {match.group(2)}(" in source, match.group(0)
