"""`status.json`: what a run is doing now, written by `train` and read by `llama-lora runs` and the dashboard.

    running      pid, host, started_at, heartbeat_at (rewritten every HEARTBEAT_S seconds), total_steps
    finished     finished_at
    failed       error: the one line the CLI printed
    interrupted  error, checkpoint: the last complete checkpoint (resume from it)
    died         never written: a `running` file whose process is gone (same host) or whose heartbeat is
                 older than DEAD_AFTER_S (another host, or a process that hangs without its heartbeat)

Every write replaces the whole file atomically, so a reader sees the old state or the new one, never half.
A run killed with SIGKILL leaves `running` behind; `read` turns that into `died`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_lora import run_dir

HEARTBEAT_S = 10.0
DEAD_AFTER_S = 45.0  # three heartbeats missed; the `died` a dashboard shows comes well within a minute
STATES = ("running", "finished", "failed", "interrupted", "died")


def path_of(run: Path) -> Path:
    return run / "status.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _zombie(pid: int) -> bool:
    """A process killed but not yet reaped by its parent still answers kill(pid, 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def read(run: Path, now: float | None = None) -> dict[str, Any] | None:
    """The run's status.json with `died` worked out, or None for a run that has none (an older run)."""
    try:
        status = json.loads(path_of(run).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("state") not in STATES:
        return None
    if status["state"] == "running":
        now = time.time() if now is None else now
        age = now - float(status.get("heartbeat", 0))
        pid, here = status.get("pid"), status.get("host") == socket.gethostname()
        gone = here and isinstance(pid, int) and (not _pid_alive(pid) or _zombie(pid))
        if gone or age > DEAD_AFTER_S:
            why = "its process is gone" if gone else f"no heartbeat for {age:.0f} s"
            status = {**status, "state": "died", "error": f"the training process stopped ({why})"}
    return status


class Recorder:
    """The writer `train` holds while a run is in progress (the main process only): `running` with a
    heartbeat from a daemon thread, then exactly one final state (`end`)."""

    def __init__(self, run: Path, **fields: Any):
        self.path, self.lock = path_of(run), threading.Lock()
        self.status: dict[str, Any] = {
            "state": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": run_dir.timestamp(),
            **fields,
        }
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="llama-lora-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self.lock:
            now = time.time()
            self.status["heartbeat"] = now
            self.status["heartbeat_at"] = run_dir.timestamp()
            run_dir.write_json(self.path, self.status)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:  # the run directory went away (replaced by --overwrite): nothing to report to
                return

    def update(self, **fields: Any) -> None:
        self.status.update(fields)
        self._write()

    def end(self, state: str, **fields: Any) -> None:
        """The final state; the heartbeat stops first so that it cannot write `running` over it."""
        self._stop.set()
        self._thread.join()
        self.status.update(state=state, ended_at=run_dir.timestamp(), **fields)
        self.status.pop("pid", None)
        self._write()


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for `exc` (its message for llama-lora's own errors)."""
    from llama_lora.errors import LlamaLoraError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, LlamaLoraError) else f"{type(exc).__name__}: {text}".rstrip(": ")


@contextlib.contextmanager
def recorded(run: Path, enabled: bool = True, **fields: Any) -> Iterator[Recorder | None]:
    """`running` while the block runs, then `finished`, `interrupted` (Ctrl-C: the last checkpoint named) or
    `failed` with the error's line; the error goes on. `enabled` False (the other processes of a
    data-parallel run) records nothing and yields None."""
    if not enabled:
        yield None
        return
    recorder = Recorder(run, **fields)
    try:
        yield recorder
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130
        saved = run_dir.checkpoint_dirs(run)  # written atomically: each one listed is complete
        recorder.end(
            "interrupted" if stopped else "failed",
            error=error_line(exc) or "interrupted",
            checkpoint=str(saved[-1]) if saved else None,
        )
        raise
    recorder.end("finished")


# ------------------------------------------------------------------------------------- listing runs


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime_iso(path: Path) -> str | None:
    if not path.exists():
        return None
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _last(records: list[dict[str, Any]], key: str) -> tuple[int | None, Any]:
    for record in reversed(records):
        if record.get(key) is not None:
            return record.get("step"), record[key]
    return None, None


def run_row(run: Path) -> dict[str, Any]:
    """A run's key figures: train_summary.json where it finished, else config.yaml and metrics.jsonl so far.

    status: the state in status.json (running, finished, failed, interrupted, died; `error` says why for the
    last three); for a run from before status.json: `finished` (has a summary), `has checkpoints` (resumable)
    or `incomplete`.
    """
    summary = read_json(run / "train_summary.json") or {}
    cfg = read_config(run / "config.yaml")
    state = read(run) or {}
    records = run_dir.records_up_to(run / "metrics.jsonl", 10**12)

    def section(name: str) -> dict[str, Any]:
        value = cfg.get(name)
        return value if isinstance(value, dict) else {}

    checkpoints = run_dir.checkpoint_dirs(run)
    status = state.get("state") or (
        "finished" if summary else "has checkpoints" if checkpoints else "incomplete"
    )
    date = summary.get("finished_at") or state.get("started_at") or _mtime_iso(run / "config.yaml")
    started = state.get("started_at") or _mtime_iso(run / "config.yaml")
    ended = state.get("ended_at") or summary.get("finished_at")
    ended = ended or (run_dir.timestamp() if status == "running" else state.get("heartbeat_at"))
    peft, use_dora = section("peft"), section("peft").get("use_dora")
    step, loss = _last(records, "loss")
    return {
        "run": str(run),
        "date": date,
        "model": summary.get("model", section("model").get("name")),
        "data": summary.get("dataset", section("data").get("source")),
        "method": summary.get("method", None if use_dora is None else ("dora" if use_dora else "lora")),
        "objective": section("train").get("objective", "sft"),
        "r": peft.get("r"),
        "alpha": peft.get("lora_alpha"),
        "eval_loss_before": summary.get("eval_loss_before"),
        "eval_loss": summary.get("eval_loss", _last(records, "eval_loss")[1]),
        "loss": loss,
        "tokens_per_second": summary.get("tokens_per_second", _last(records, "tokens_per_second")[1]),
        "step": step,
        "steps": summary.get("steps", state.get("total_steps")),
        "checkpoints": len(checkpoints),
        "status": status,
        "error": state.get("error"),
        "started_at": started,
        "duration_s": _seconds_between(started, ended),
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Rows for every run under `root`, oldest first (runs without a date last)."""
    if not root.is_dir():
        raise run_dir.RunDirError(f"{root}: no such directory")
    rows = [run_row(run) for run in run_dir.find_runs(root)]
    return sorted(rows, key=lambda r: (r["date"] is None, r["date"] or "", r["run"]))
