"""Trackers get exactly the metrics.jsonl records; `llama-lora runs` lists run directories."""

from __future__ import annotations

import gc
import json
import sys
import types

import pytest

from llama_lora import cli, run_dir, run_status
from llama_lora.config import load_config
from llama_lora.errors import ConfigError
from llama_lora.train import tracking
from llama_lora.train.loop import train
from tests.conftest import run_cli, run_in_process, tiny_overrides


class FakeSink:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.closed: list[bool] = []

    def log(self, values, step):
        self.logged.append((values, step))

    def close(self, ok=True):
        self.closed.append(ok)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", []),
        ("[]", []),
        ("tensorboard", ["tensorboard"]),
        ("[wandb,mlflow,wandb]", ["wandb", "mlflow"]),
    ],
)
def test_report_to_accepts_a_list_one_name_or_none(value, expected):
    assert load_config(overrides=[f"train.report_to={value}"]).train.report_to == expected


def test_report_to_rejects_unknown_trackers_naming_the_key():
    with pytest.raises(ConfigError, match=r"^train\.report_to"):
        load_config(overrides=["train.report_to=[comet]"])


# ----------------------------------------------------------------------------------- MetricsLog fan-out


def test_metrics_log_sends_each_record_to_sinks_and_closes_them(tmp_path):
    sink = FakeSink()
    log = run_dir.MetricsLog(tmp_path / "metrics.jsonl", sinks=[sink])
    log.write({"step": 0, "epoch": 0.0, "eval_loss": None})  # no eval data: nothing to track
    log.write({"step": 1, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 100.0})
    log.write({"step": 1, "epoch": 0.5, "eval_loss": float("nan")})  # non-finite: null in jsonl, not tracked
    log.close()
    log.close()  # idempotent
    assert sink.logged == [({"loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 100.0}, 1)]
    assert sink.closed == [True]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        1,
    ]


def test_sinks_of_a_log_dropped_without_close_end_as_failed(tmp_path):
    sink = FakeSink()
    log = run_dir.MetricsLog(tmp_path / "metrics.jsonl", sinks=[sink])
    log.write({"step": 1, "loss": 1.0})
    del log  # what happens to train()'s log when the loop raises
    gc.collect()
    assert sink.closed == [False]


def test_tensorboard_sink_passes_values_to_the_writer():
    calls = []

    class Writer:
        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

        def flush(self):
            calls.append("flush")

        def close(self):
            calls.append("close")

    sink = tracking.TensorBoardSink(Writer())
    sink.log({"loss": 1.5, "learning_rate": 2e-4}, step=3)
    sink.close()
    assert calls == [("loss", 1.5, 3), ("learning_rate", 2e-4, 3), "flush", "close"]


# ------------------------------------------------------------------ wandb / mlflow through fake modules


def _fake_module(name: str, calls: list, **returns) -> types.ModuleType:
    module = types.ModuleType(name)

    def recorder(fn):
        def call(*args, **kwargs):
            calls.append((fn, args, kwargs))
            return returns.get(fn)

        return call

    for fn in (
        "init",
        "set_tracking_uri",
        "set_experiment",
        "start_run",
        "log_params",
        "log_metrics",
        "end_run",
    ):
        setattr(module, fn, recorder(fn))
    return module


def test_wandb_is_offline_by_default_and_gets_config_and_records(tmp_path, monkeypatch):
    calls: list = []
    run = types.SimpleNamespace(
        log=lambda values, step: calls.append(("log", values, step)),
        finish=lambda exit_code: calls.append(("finish", exit_code)),
    )
    monkeypatch.setitem(sys.modules, "wandb", _fake_module("wandb", calls, init=run))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak")
    monkeypatch.setattr(tracking, "_installed", lambda module: True)
    cfg = load_config(overrides=["train.report_to=wandb", f"output.dir={tmp_path / 'r1'}"])
    log = run_dir.MetricsLog(tmp_path / "m.jsonl", sinks=tracking.open_sinks(cfg, tmp_path / "r1"))
    log.write({"step": 2, "epoch": 0.1, "loss": 0.75})
    log.close()
    (_, _, init_kwargs), *rest = calls
    assert init_kwargs["mode"] == "offline" and init_kwargs["name"] == "r1"
    assert init_kwargs["config"] == cfg.model_dump(mode="json")
    assert rest == [("log", {"loss": 0.75}, 2), ("finish", 0)]
    assert "hf_do_not_leak" not in repr(calls)

    assert tracking.open_sinks(cfg, tmp_path / "r1", is_main=False) == []  # other processes track nothing


def test_mlflow_logs_to_local_mlruns_unless_told_otherwise(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", _fake_module("mlflow", calls))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setattr(tracking, "_installed", lambda module: True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["train.report_to=[mlflow]"])
    log = run_dir.MetricsLog(tmp_path / "m.jsonl", sinks=tracking.open_sinks(cfg, tmp_path / "r2"))
    log.write({"step": 4, "epoch": 0.2, "eval_loss": 1.25})
    del log  # dropped without close: the run ends as failed
    gc.collect()
    names = [fn for fn, _, _ in calls]
    assert names == [
        "set_tracking_uri",
        "set_experiment",
        "start_run",
        "log_params",
        "log_metrics",
        "end_run",
    ]
    assert calls[0][1] == ((tmp_path / "mlruns").resolve().as_uri(),)
    assert calls[3][1][0]["train.report_to"] == ["mlflow"] and calls[3][1][0]["peft.r"] == cfg.peft.r
    assert calls[4][1:] == (({"eval_loss": 1.25},), {"step": 4})
    assert calls[5][2] == {"status": "FAILED"}


# --------------------------------------------------------------------------------- training, end to end


def test_tensorboard_events_equal_metrics_jsonl(tmp_path, tiny_model_dir, alpaca_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_config(
        overrides=tiny_overrides(tiny_model_dir, alpaca_file, out, **{"train.report_to": "tensorboard"})
    )
    result = train(cfg, quiet=True)
    records = run_dir.read_metrics(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss"):
        expected = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key  # float32 events
    assert set(events.Tags()["scalars"]) == {
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "eval_loss",
    }
    assert result.summary["finished_at"].endswith("+00:00")


def test_missing_tracker_is_one_line_exit_2_and_no_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    out = tmp_path / "run"
    argv = ["llama-lora", "train", "-q", "data.source=demo", "train.report_to=[tensorboard,wandb]"]
    monkeypatch.setattr(sys, "argv", [*argv, f"output.dir={out}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert "\n" not in stderr and "train.report_to" in stderr and "pip install wandb" in stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------- llama-lora runs


def _fake_runs(root):
    a = root / "exp" / "a"
    a.mkdir(parents=True)
    (a / "config.yaml").write_text("model: {name: m-a}\n")
    (a / "train_summary.json").write_text(
        json.dumps(
            {
                "model": "m-a",
                "dataset": "alpaca.jsonl",
                "method": "dora",
                "eval_loss_before": 2.0,
                "eval_loss": 1.5,
                "tokens_per_second": 1234.5,
                "steps": 10,
                "finished_at": "2026-01-02T03:04:05+00:00",
            }
        )
    )
    b = root / "b"
    (b / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (b / "config.yaml").write_text("model: {name: m-b}\ndata: {source: demo}\npeft: {use_dora: false}\n")
    (root / "notes").mkdir()  # not a run
    return a, b


def test_list_runs_reads_summaries_and_unfinished_configs(tmp_path):
    a, b = _fake_runs(tmp_path)
    rows = {r["run"]: r for r in run_status.list_runs(tmp_path)}
    assert set(rows) == {str(a), str(b)}
    assert rows[str(a)] == {
        "run": str(a),
        "date": "2026-01-02T03:04:05+00:00",
        "model": "m-a",
        "data": "alpaca.jsonl",
        "method": "dora",
        "eval_loss_before": 2.0,
        "eval_loss": 1.5,
        "tokens_per_second": 1234.5,
        "steps": 10,
        "checkpoints": 0,
        "status": "finished",
        "objective": "sft",
        "r": None,
        "alpha": None,
        "loss": None,
        "step": None,
        "error": None,
        "started_at": rows[str(a)]["started_at"],  # config.yaml's time: no status.json
        "duration_s": rows[str(a)]["duration_s"],
    }
    unfinished = rows[str(b)]
    assert (unfinished["model"], unfinished["data"], unfinished["method"]) == ("m-b", "demo", "lora")
    assert unfinished["status"] == "has checkpoints" and unfinished["eval_loss"] is None
    assert run_status.list_runs(a) == [rows[str(a)]]  # ROOT may be a run itself


def test_runs_cli_table_json_empty_and_missing(tmp_path):
    a, b = _fake_runs(tmp_path / "runs")
    table = run_cli("runs", str(tmp_path / "runs"), env={"COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert "2.000 -> 1.500" in table.stdout and "1234" in table.stdout and "has checkpoints" in table.stdout
    as_json = run_in_process("runs", str(tmp_path / "runs"), "--json")
    assert [r["run"] for r in json.loads(as_json.stdout)] == [str(a), str(b)]  # oldest first

    (tmp_path / "empty").mkdir()
    empty = run_in_process("runs", str(tmp_path / "empty"))
    assert empty.returncode == 0 and "no runs" in empty.stdout
    missing = run_in_process("runs", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "nowhere" in missing.stderr
