"""Paired A/B of two training setups in one process: alternating optimizer steps over the same micro-batches.

    python bench/paired_steps.py --a peft.use_dora=false --b peft.use_dora=true [--rows 64] [--epochs 2]
    python bench/paired_steps.py --b-fused /path/to/other/fused.py        # A/B of two versions of fused.py

Separate runs on a shared machine drift by more than most single changes move (bench/RESULTS.md). Here both
setups live in one process and take turns, step by step (the order flips each step), over the same
micro-batches, so drift hits both alike (two identical setups measure close to 1: bench/RESULTS.md).
Reports tokens/s (non-padding) of each side over the timed steps and the ratio B/A; the first two steps of
each side are warm-up and not timed. Each side is built by `llama_lora.build`, the functions `train` builds
with (same settings, fast path, objective, optimizer); `--a`/`--b` take config overrides for that side only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import data_rows  # noqa: E402

from llama_lora.config import load_config  # noqa: E402
from llama_lora.kernels import fused  # noqa: E402
from llama_lora.train import build as B  # noqa: E402


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(overrides: list[str], fused_module) -> dict:
    """One side, built by llama_lora.build exactly as `train` builds it (settings, fast path, objective)."""
    cfg = load_config(overrides=overrides)
    loaded = B.load(cfg)
    setup = B.attach(loaded, layers=fused_module)
    s = loaded.settings
    loss_fn = setup.objective.module.to(s.device)
    loss_fn.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)
    return {
        "loss_fn": loss_fn,
        "optimizer": setup.optimizer,
        "plan": [micro_batch for group in setup.steps for micro_batch in group],
        "rows": loaded.ds.train,
        "collate": setup.objective.collate,
        "device": s.device,
        "autocast": (lambda: torch.autocast(s.device, dtype=dtype)) if dtype else nullcontext,
        "compute_dtype": dtype or torch.float32,  # the matmuls' dtype: autocast's, else float32
        "seconds": 0.0,
    }


def build_on_rows(rows: list[dict], *sides: tuple[list[str], object]) -> list[dict]:
    """One side per (overrides, fused module), each built on `rows` (Alpaca-style, all for training)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows))
        common = [
            f"data.source={rows_file}",
            "data.format=alpaca",
            "data.template=alpaca",
            "data.eval_fraction=0",
        ]
        return [build(common + overrides, layers) for overrides, layers in sides]


def step(side: dict, micro_batch: list[int]) -> int:
    rows = [side["rows"][i] for i in micro_batch]
    batch = {k: v.to(side["device"]) for k, v in side["collate"](rows).items()}
    start = time.perf_counter()
    with side["autocast"]():
        loss_sum, n_labels = side["loss_fn"](**batch)
    (loss_sum / n_labels).backward()
    side["optimizer"].step()
    side["optimizer"].zero_grad(set_to_none=True)
    if side["device"] == "cuda":
        torch.cuda.synchronize()
    side["seconds"] += time.perf_counter() - start
    return sum(len(r) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", nargs="*", default=[], help="config overrides for side A")
    parser.add_argument("--b", nargs="*", default=[], help="config overrides for side B")
    parser.add_argument("--b-fused", help="another version of llama_lora/fused.py for side B (code A/B)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the rows (each side)")
    parser.add_argument("--data", help="Alpaca-style JSON rows (default: as bench/train_speed.py)")
    args = parser.parse_args()

    rows, source = data_rows(args.rows, args.data)
    b_fused = load_module(args.b_fused, "fused_b") if args.b_fused else fused
    a, b = build_on_rows(rows, (args.a, fused), (args.b, b_fused))
    if a["plan"] != b["plan"]:
        raise SystemExit("the two sides plan different micro-batches: compare setups that batch alike")
    for micro_batch in a["plan"][:2]:  # warm-up, untimed
        step(a, micro_batch)
        step(b, micro_batch)
    a["seconds"] = b["seconds"] = 0.0
    tokens, ratios = 0, []
    for epoch in range(args.epochs):
        for i, micro_batch in enumerate(a["plan"]):
            before = a["seconds"], b["seconds"]
            first, second = (a, b) if (i + epoch) % 2 == 0 else (b, a)
            tokens += step(first, micro_batch)
            step(second, micro_batch)
            ratios.append((a["seconds"] - before[0]) / (b["seconds"] - before[1]))
    print(f"data: {source}, {len(rows)} rows, {len(ratios)} steps per side")
    print(f"A {' '.join(args.a) or '(defaults)'}: {tokens / a['seconds']:.1f} tokens/s")
    b_name = " ".join(args.b) + (f" fused.py from {args.b_fused}" if args.b_fused else "")
    print(f"B {b_name.strip() or '(defaults)'}: {tokens / b['seconds']:.1f} tokens/s")
    print(
        f"B/A speed {a['seconds'] / b['seconds']:.3f} (median per-step ratio {statistics.median(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
