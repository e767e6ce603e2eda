"""`llama-lora eval`'s scoring speed, side by side in one process: float32 against bf16, and batch sizes.

    python bench/eval_speed.py [--rows 200] [--task arc_easy] [--data-dir ../shared/data/benchmarks]

SmolLM2-135M-Instruct (the embedded model) alone, lm-eval's task on the local files, the same rows for every
setting; settings are interleaved over two rounds so that drift hits them alike. Prints rows/s per setting,
the ratios against float32 at batch 16, and each setting's score (bf16 moves a few rows' choice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/benchmarks")
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from llama_lora.evaluate import lmeval
    from llama_lora.infer import loading

    loaded = loading.load(base="smollm2-135m-instruct", log=lambda *a: None)
    settings = [("fp32", 16), ("bf16", 8), ("bf16", 16), ("bf16", 32)]
    speeds: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    scores = {}
    for _ in range(args.rounds):
        for precision, batch in settings:
            loaded.model.float()  # run_loaded casts to the evaluation dtype from float32
            result = lmeval.run_loaded(
                loaded, [args.task], args.data_dir, args.rows, batch, precision, quiet=True
            )
            side = result["sides"]["model"][args.task]
            speeds[(precision, batch)].append(side["rows_per_s"])
            scores[(precision, batch)] = side["values"]
    reference = statistics.median(speeds[("fp32", 16)])
    print(f"{args.task}, {args.rows} rows, SmolLM2-135M-Instruct, {args.rounds} rounds")
    print(f"{'precision':>9} {'batch':>5} {'rows/s (each round)':>24} {'median':>7} {'x fp32/16':>9}  score")
    for key in settings:
        med = statistics.median(speeds[key])
        runs = " / ".join(f"{s:.2f}" for s in speeds[key])
        score = ", ".join(f"{k} {v:.4f}" for k, v in scores[key].items())
        print(f"{key[0]:>9} {key[1]:>5} {runs:>24} {med:>7.2f} {med / reference:>9.2f}  {score}")


if __name__ == "__main__":
    main()
