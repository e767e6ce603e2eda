"""Where a training step's time goes, against the machine's matmul limit.

    python bench/profile_step.py [--rows 64] [--steps 6] [--top 15] [override ...]   e.g. peft.use_dora=false

Builds one side exactly as `train` does (bench/paired_steps.py's `build_on_rows`: settings, fast path, objective,
optimizer), runs two untimed warm-up steps, then profiles `--steps` optimizer steps with torch's profiler and
reports:

- the matmuls (aten mm/addmm/bmm): their share of the profiled time, the FLOPs they did and the rate they ran
  at, overall and for the costliest shapes;
- the costliest other operators (self time);
- the machine's own rate for the same matmul shapes, dtype and thread count, timed alone (the median of
  repeated calls of every profiled shape on fresh contiguous operands, weighted by its calls), and so the limit: the tokens/s the steps
  would reach if every matmul ran at that rate and nothing else took time.

Profiling slows the steps down somewhat; the tokens/s it prints is for reading the shares, not a figure to
quote (bench/train_speed.py measures speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_steps import build_on_rows, step  # noqa: E402
from train_speed import data_rows  # noqa: E402

from llama_lora.kernels import fused

MATMULS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0}


def matmul_dims(name: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, m, k, n) of one profiled matmul call from its input shapes."""
    try:
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return b, m, k, n
        first = MATMULS[name]  # addmm: (self, mat1, mat2)
        (m, k), (_, n) = shapes[first], shapes[first + 1]
        return 1, m, k, n
    except (KeyError, ValueError, IndexError, TypeError):
        return None


def alone_seconds(dims: tuple[int, int, int, int], dtype: torch.dtype, repeats: int = 7) -> float:
    """Median seconds of one such matmul on fresh operands, timed alone."""
    b, m, k, n = dims
    x, w = torch.randn(b, m, k, dtype=dtype), torch.randn(b, k, n, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        torch.bmm(x, w) if b > 1 else torch.mm(x[0], w[0])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, as for `llama-lora train`")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps profiled")
    parser.add_argument("--top", type=int, default=15, help="rows in each table")
    parser.add_argument("--data", help="Alpaca-style JSON rows (default: as bench/train_speed.py)")
    args = parser.parse_args()

    rows, source = data_rows(args.rows, args.data)
    (side,) = build_on_rows(rows, (args.overrides, fused))
    plan = side["plan"]
    if len(plan) < 2 + args.steps:
        raise SystemExit(f"only {len(plan)} micro-batches: use more --rows or fewer --steps")
    for micro_batch in plan[:2]:
        step(side, micro_batch)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        tokens = sum(step(side, mb) for mb in plan[2 : 2 + args.steps])
        seconds = time.perf_counter() - start

    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    by_shape, other = {}, {}
    for e in events:
        dims = matmul_dims(e.key, e.input_shapes) if e.key in MATMULS else None
        if dims is None:
            other[e.key] = other.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
            continue
        entry = by_shape.setdefault(dims, [0, 0.0])
        entry[0] += e.count
        entry[1] += e.self_cpu_time_total / 1e6

    def flops(dims, count):
        b, m, k, n = dims
        return 2.0 * b * m * k * n * count

    mm_seconds = sum(s for _, s in by_shape.values())
    mm_flops = sum(flops(d, c) for d, (c, _) in by_shape.items())
    dtype = side["compute_dtype"]
    alone = {d: alone_seconds(d, dtype) for d in by_shape}
    limit_seconds = sum(alone[d] * c for d, (c, _) in by_shape.items())

    print(f"data: {source}, {args.steps} steps, {tokens} tokens, {torch.get_num_threads()} threads, {dtype}")
    print(f"profiled: {seconds:.1f} s, {tokens / seconds:.1f} tokens/s (slowed by the profiler)")
    print(
        f"matmuls: {mm_seconds:.1f} s of {total:.1f} s operator time ({100 * mm_seconds / total:.0f}%), "
        f"{mm_flops / 1e9 / tokens:.3f} GFLOP/token, {mm_flops / 1e9 / mm_seconds:.0f} GFLOP/s in the steps, "
        f"{mm_flops / 1e9 / limit_seconds:.0f} GFLOP/s alone"
    )
    print(
        f"limit (every matmul at its alone rate, nothing else): {tokens / limit_seconds:.0f} tokens/s; "
        f"these steps: {100 * limit_seconds / seconds:.0f}% of it"
    )
    print(f"\n{'matmul b x m x k x n':28s} {'calls':>6s} {'s':>7s} {'GFLOP/s':>8s} {'alone':>7s}")
    for d, (count, s) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[: args.top]:
        shape = " x ".join(map(str, d if d[0] > 1 else d[1:]))
        rate, alone_rate = flops(d, count) / 1e9 / s, flops(d, 1) / 1e9 / alone[d]
        print(f"{shape:28s} {count:6d} {s:7.2f} {rate:8.0f} {alone_rate:7.0f}")
    print(f"\n{'other operators (self time)':44s} {'s':>7s} {'share':>6s}")
    for name, s in sorted(other.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{name[:44]:44s} {s:7.2f} {100 * s / total:5.1f}%")


if __name__ == "__main__":
    main()
