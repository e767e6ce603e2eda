"""Run-directory layout, metrics.jsonl, summaries and atomic writes. No ML logic.

<output.dir>/
  config.yaml          resolved config (no secrets)
  adapter/             PEFT adapter + tokenizer files (written atomically)
  checkpoints/         checkpoint-<step>/ (adapter + optimizer state, safetensors)
  metrics.jsonl        one JSON object per logging/eval step
  train_summary.json   the run's key figures
  loss.png             train and eval loss curves
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llama_lora.errors import LlamaLoraError


class RunDirError(LlamaLoraError):
    pass


def refuse_existing(path: Path, overwrite: bool = False) -> None:
    """Refuse to clobber an earlier run unless `overwrite` (writes nothing)."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirError(
            f"output.dir: {path} already holds a run; pass --overwrite to replace it or choose another "
            "output.dir"
        )


def prepare(path: Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse to clobber an earlier run unless `overwrite`."""
    refuse_existing(path, overwrite)
    if path.exists():
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any directory
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path for `target` (same suffix, so readers that go by it still work); when
    the block succeeds it is renamed onto `target` in one step, when it raises it is removed. The parent
    directory must exist."""
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps({k: _clean(v) for k, v in data.items()}, indent=2) + "\n")


def tracked_values(record: dict[str, Any]) -> dict[str, float]:
    """What trackers get from a metrics record: its numbers other than step and epoch (None dropped)."""
    return {
        k: v
        for k, v in record.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _close_sinks(sinks: list, ok: bool) -> None:
    while sinks:
        sinks.pop(0).close(ok=ok)


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line so a crash loses at most the line being written.

    Every record also goes to `sinks` (see tracking.py) at the record's step. `close()` ends them as
    finished; a log dropped without `close()` (training raised) ends them as failed when it is collected
    or at interpreter exit. With `path` None the records are only kept in memory (the processes other than
    the main one of a data-parallel run).
    """

    def __init__(
        self, path: Path | None, records: list[dict[str, Any]] | None = None, sinks: list | None = None
    ):
        self.path = path
        self.records: list[dict[str, Any]] = list(records or [])
        self.sinks = list(sinks or [])
        self._failed = weakref.finalize(self, _close_sinks, self.sinks, False)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        values = tracked_values(record)
        if values:
            for sink in self.sinks:
                sink.log(values, step=int(record.get("step", len(self.records))))

    def close(self) -> None:
        self._failed.detach()
        _close_sinks(self.sinks, ok=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The records of metrics.jsonl up to `step`, skipping a line torn by a kill."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the process died
        if record.get("step", 0) <= step:
            kept.append(record)
    return kept


def metrics_up_to(path: Path, step: int, sinks: list | None = None) -> MetricsLog:
    """Resuming at `step`: keep the records up to it, drop later ones (they came after the checkpoint, and
    the resumed run writes them again) and a line torn by a kill; rewrite the file atomically."""
    kept = records_up_to(path, step)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return MetricsLog(path, kept, sinks)


def plot_losses(records: list[dict[str, Any]], path, title: str = "") -> None:
    """loss.png: train loss per logging step and eval loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#3b6ea8")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d0792b")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoint_dirs(run: Path) -> list[Path]:
    """checkpoint-<step> directories by step. Temporary `.checkpoint-*.tmp-*` siblings are never included."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(run: Path, keep: int) -> None:
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- listing runs


def timestamp() -> str:
    """Now, as an ISO-8601 UTC timestamp for summaries (`finished_at`)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_run(path: Path) -> bool:
    return (path / "train_summary.json").is_file() or (path / "config.yaml").is_file()


def adapter_dir_of(path: str | Path) -> Path | None:
    """The one answer to "run directory or adapter directory?": the adapter directory `path` names (a run
    directory holds it in adapter/), or None when `path` is neither."""
    path = Path(path)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def run_of(adapter_dir: Path) -> Path | None:
    """The run directory an adapter directory belongs to (its parent holds config.yaml), or None."""
    return adapter_dir.parent if (adapter_dir.parent / "config.yaml").is_file() else None


def find_runs(root: Path, depth: int = 2) -> list[Path]:
    """Run directories at `root` or up to `depth` levels below it; a run's own subdirectories are not searched."""
    if is_run(root):
        return [root]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found.extend(find_runs(child, depth - 1))
    return found
