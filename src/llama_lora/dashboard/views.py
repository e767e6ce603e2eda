"""What the dashboard shows, read from run directories: the runs table, one run (settings, status, metrics
from a line offset, artifacts with their checks and the commands that use them), configs side by side.

The run directory is the source of truth and is only read here. A run is named by its path relative to the
dashboard's root (`.` when the root is a run itself); a name that leaves the root is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama_lora import run_dir, run_status
from llama_lora.errors import LlamaLoraError


class DashboardError(LlamaLoraError):
    pass


class NotFound(DashboardError):
    pass


def run_id(root: Path, run: Path) -> str:
    return run.resolve().relative_to(root.resolve()).as_posix() or "."


def locate(root: Path, name: str) -> Path:
    """The run directory called `name` under `root`."""
    path = (root / name).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise NotFound(f"{name}: not under {root}")
    if not path.is_dir() or not run_dir.is_run(path):
        raise NotFound(f"{name}: no run there")
    return path


def runs(root: Path) -> list[dict[str, Any]]:
    """The runs table: `llama-lora runs`' rows, each with its id."""
    if not root.is_dir():
        return []
    return [{**row, "id": run_id(root, Path(row["run"]))} for row in run_status.list_runs(root)]


def metrics(run: Path, since: int = 0) -> dict[str, Any]:
    """metrics.jsonl from line `since` on (a torn last line waits for the next poll). `reset` when the file
    is shorter than `since`: a resumed run rewrote it, so the caller starts again from `records`."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    reset = since > len(lines)
    start = 0 if reset else since
    records = []
    for number, line in enumerate(lines[start:], start):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            lines = lines[:number]  # being written: read again next time
            break
    return {"records": records, "next": len(lines), "reset": reset}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} -> {"train.learning_rate": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_table(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configs side by side: one row per dotted key any of them has, `differs` where the values do."""
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    rows = []
    for key in keys:
        values = [f.get(key) for f in flat]
        rows.append({"key": key, "values": values, "differs": any(v != values[0] for v in values[1:])})
    return rows


def detail(root: Path, run: Path) -> dict[str, Any]:
    """One run's page: its row, resolved config, summary, status, artifacts and which reports exist."""
    return {
        "id": run_id(root, run),
        "row": run_status.run_row(run),
        "status": run_status.read(run),
        "config": run_status.read_config(run / "config.yaml"),
        "summary": run_status.read_json(run / "train_summary.json"),
        "compare": _compare_summary(run),
        "report": (run / "report.html").is_file(),
        "artifacts": artifacts(run),
    }


def _compare_summary(run: Path) -> dict[str, Any] | None:
    """compare.json as two tables, where compare has run: the held-out figures (base, adapter) and the
    general-skills rows (task, metric, base, adapter, delta, verdict) when benchmarks were run."""
    data = run_status.read_json(run / "compare.json")
    if data is None:
        return None
    base, tuned = data.get("base") or {}, data.get("adapter_metrics") or {}
    held_out = [
        [key, base[key], tuned[key]]
        for key in base
        if isinstance(base[key], (int, float)) and isinstance(tuned.get(key), (int, float))
    ]
    bench = data.get("benchmarks")
    rows = None
    if isinstance(bench, dict) and "comparison" in bench:
        from llama_lora.evaluate.lmeval import table_rows

        rows = [list(map(str, row)) for row in table_rows(bench)]
    return {"n": data.get("n"), "held_out": held_out, "benchmarks": rows}


_CHECKS = (
    "passed",
    "type",
    "size_bytes",
    "max_abs_logit_diff",
    "greedy_token_agreement",
    "verifiers",
    "dtype",
    "rank",
)


def _checks(report: Path) -> dict[str, Any] | None:
    data = run_status.read_json(report)
    return None if data is None else {k: data[k] for k in _CHECKS if k in data}


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def artifacts(run: Path) -> list[dict[str, Any]]:
    """What the run has produced so far, with its verification figures and the commands that use it."""
    cfg = run_status.read_config(run / "config.yaml")
    base = str((cfg.get("model") or {}).get("name", "BASE"))
    dora = bool((cfg.get("peft") or {}).get("use_dora"))
    found = []
    adapter, merged, lora = run / "adapter", run / "merged", run / "gguf-adapter"
    if (adapter / "adapter_config.json").is_file():
        found.append(_artifact("adapter", adapter, None, _adapter_commands(run, base, dora)))
    if (merged / "config.json").is_file():
        commands = [
            f"llama-lora infer --base {merged} 'Who are you?'",
            f"vllm serve {merged}",
            f"llama-lora export gguf {run} --type q8_0",
        ]
        found.append(_artifact("merged", merged, merged / "merge_report.json", commands))
    for gguf in sorted(run.glob("model-*.gguf")):
        commands = [
            f"llama-cli -m {gguf} -cnv",
            f"llama-server -m {gguf}",
            f"cd {run} && ollama create {run.name} -f Modelfile && ollama run {run.name}",
        ]
        found.append(_artifact("gguf", gguf, run / "export_report.json", commands))
    if (lora / "adapter.gguf").is_file():
        commands = [
            f"llama-cli -m {lora / 'base-f16.gguf'} --lora {lora / 'adapter.gguf'} -cnv",
            f"cd {lora} && ollama create {run.name} -f Modelfile && ollama run {run.name}",
        ]
        found.append(_artifact("gguf-adapter", lora / "adapter.gguf", lora / "export_report.json", commands))
    return found


def _artifact(kind: str, path: Path, report: Path | None, commands: list[str]) -> dict[str, Any]:
    checks = _checks(report) if report is not None else None
    return {
        "kind": kind,
        "path": str(path),
        "size_bytes": _size(path),
        "checks": checks,
        "commands": commands,
    }


def _adapter_commands(run: Path, base: str, dora: bool) -> list[str]:
    vllm = (
        "# vLLM serves LoRA adapters, not DoRA: merge first (llama-lora merge) and serve merged/"
        if dora
        else f"vllm serve {base} --enable-lora --lora-modules {run.name}={run / 'adapter'}"
    )
    return [f"llama-lora serve {run}", f"llama-lora chat --adapter {run}", vllm, f"llama-lora merge {run}"]
