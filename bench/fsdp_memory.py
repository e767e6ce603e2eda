"""Peak memory per process, one unsharded process against two sharded (FSDP2) ones, on the same rows.

    python bench/fsdp_memory.py [--models demo,1b] [--sides 1,1-nofast,2] [--steps 2] [--rows-1b 1]
                                [--repeat 1] [--out results.json]

`demo`: SmolLM2-135M-Instruct with `--preset demo`; `1b`: a random-weight model with Llama-3.2-1B's exact
architecture (train_speed.py builds it, once, into the cache) on Alpaca rows cut to 128 tokens, `--rows-1b`
rows a micro-batch (DoRA r 16 on all seven projections; bf16 where the CPU has it). Each side is a separate
`llama-lora train` launch on the same rows:

    1          one process, unsharded (`train.grad_accum: 2`: an optimizer step holds the same micro-batches
               as a step of two processes), the fast path as `auto` chooses it
    1-nofast   the same without the fast path (`train.fused: false`, `train.packing: false`), which sharding
               turns off: the unsharded process that computes what a sharded one computes
    2          two processes under torchrun, `train.sharding: fsdp`

The figures are each process's peak RSS as `train_summary.json` reports it (`peak_memory_per_process`; the
main process's own figure after it wrote the adapter where that is higher), with the megabytes of parameters
each holds, and each peak as a fraction of side 1's. With --repeat N the sides alternate N times and each
process's median peak is reported (identical runs differ by a few percent). Runs go one after another: two
measurements at once would share the machine's memory and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import build_random_llama_1b, data_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_1b_dir() -> Path:
    """The 1B-shaped model, built once into the cache (about 2.5 GB in bf16) and reused. Built in a child
    process: a launch forked from a parent that held the model would report the parent's peak as its own
    (Linux keeps the largest resident size across fork and exec in ru_maxrss)."""
    from llama_lora.model import loader

    target = loader.cache_dir() / "bench" / "random-llama-3.2-1b"
    if not (target / "config.json").is_file():
        print(f"building the 1B-shaped model in {target} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--build-1b", str(target)], check=True)
    return target


def workloads(tmp: Path, steps: int, rows_1b: int) -> dict[str, list[str]]:
    """Each model's `llama-lora train` arguments, the same for both sides."""
    rows, _ = data_rows(64)
    rows_file = tmp / "rows.json"
    rows_file.write_text(json.dumps(rows))
    common = [f"train.max_steps={steps}", "train.save_steps=null", "train.eval_steps=null"]
    return {
        "demo": ["--preset", "demo", "data.max_rows=64", *common],
        "1b": [
            f"model.name={random_1b_dir()}",
            f"data.source={rows_file}",
            "data.format=alpaca",
            "data.template=alpaca",
            "data.max_length=128",
            "data.eval_fraction=0",
            "peft.use_dora=true",
            f"train.batch_size={rows_1b}",
            *common,
        ],
    }


SIDES = {
    "1": ["train.grad_accum=2"],
    "1-nofast": ["train.grad_accum=2", "train.fused=false", "train.packing=false"],
    "2": ["train.sharding=fsdp"],
}


def launch(args: list[str], out: Path, side: str) -> list[dict]:
    """One training launch; each process's peak (rank order) from its train_summary.json."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "llama_lora", "train", "--quiet", *args, *SIDES[side]]
    if side == "2":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    command += [f"output.dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    peaks = summary["peak_memory_per_process"]
    peaks[0]["peak_rss_at_end_mb"] = summary["peak_rss_mb"]  # after writing the adapter
    peaks[0]["peak_rss_mb"] = max(peaks[0]["peak_rss_mb"], summary["peak_rss_mb"])
    return peaks


def median_peaks(launches: list[list[dict]]) -> list[dict]:
    """Each process's median peak over the launches of one side, with every launch's figure."""
    out = []
    for rank, first in enumerate(launches[0]):
        figures = sorted(run[rank]["peak_rss_mb"] for run in launches)
        median = figures[(len(figures) - 1) // 2]
        out.append(
            {**first, "peak_rss_mb": median, "runs_mb": [run[rank]["peak_rss_mb"] for run in launches]}
        )
    return out


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="demo,1b", help="of demo, 1b (default both)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per launch (default 2)")
    parser.add_argument("--rows-1b", type=int, default=1, help="rows a micro-batch on 1b (default 1)")
    parser.add_argument("--sides", default="1,1-nofast,2", help=f"of {', '.join(SIDES)} (default all)")
    parser.add_argument("--repeat", type=int, default=1, help="launches of each side (median reported)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--build-1b", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_1b:
        build_random_llama_1b(Path(args.build_1b))
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs: dict[str, dict[str, list[list[dict]]]] = {m: {side: [] for side in sides} for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        plans = workloads(Path(tmp), args.steps, args.rows_1b)
        for model in models:
            for _ in range(args.repeat):
                for side in sides:
                    print(f"{model}: side {side} ...", file=sys.stderr, flush=True)
                    out = Path(tmp) / f"{model}-{side}-{len(runs[model][side])}"
                    runs[model][side].append(launch(plans[model], out, side))
    results = {m: {side: median_peaks(r) for side, r in by_side.items()} for m, by_side in runs.items()}

    import torch

    print(f"\nmachine: {machine()}; torch {torch.__version__}; {args.steps} steps per launch, ", end="")
    print(f"1b: {args.rows_1b} row(s) of up to 128 tokens a micro-batch")
    print(
        f"{'model':<6}{'side':>10}{'rank':>6}{'parameters MB':>15}{'peak RSS MB':>13}{'x side 1':>10}  runs"
    )
    for model, by_side in results.items():
        whole = by_side["1"][0]["peak_rss_mb"] if "1" in by_side else None
        for side, peaks in by_side.items():
            for rank, p in enumerate(peaks):
                ratio = f"{p['peak_rss_mb'] / whole:.2f}" if whole else "-"
                print(
                    f"{model:<6}{side:>10}{rank:>6}{p['parameters_mb']:>15.1f}{p['peak_rss_mb']:>13.0f}"
                    f"{ratio:>10}  {', '.join(f'{r:.0f}' for r in p['runs_mb'])}"
                )
    if args.out:
        report = {
            "machine": machine(),
            "torch": torch.__version__,
            "steps": args.steps,
            "rows_1b": args.rows_1b,
        }
        report["results"] = results
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
