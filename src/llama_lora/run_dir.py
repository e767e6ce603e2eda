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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_lora.errors import LlamaLoraError


class RunDirError(LlamaLoraError):
    pass


def prepare(path: Path, overwrite: bool = False) -> Path:
    """Create the run directory; refuse to clobber an earlier run unless `overwrite`."""
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"output.dir: {path} already holds a run; pass --overwrite to replace it or choose another "
                "output.dir"
            )
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps({k: _clean(v) for k, v in data.items()}, indent=2) + "\n")


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line so a crash loses at most the line being written."""

    def __init__(self, path: Path, records: list[dict[str, Any]] | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = list(records or [])

    def write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_up_to(path: Path, step: int) -> MetricsLog:
    """Resuming at `step`: keep the records up to it, drop later ones (they came after the checkpoint, and
    the resumed run writes them again) and a line torn by a kill; rewrite the file atomically."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the process died
        if record.get("step", 0) <= step:
            kept.append(record)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return MetricsLog(path, kept)


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
