"""After `make demo` in CI: the adapter beats the base in runs/demo/compare.json, the report has its general
skills section (where the benchmark files are), and the demo's log holds no other library's progress bar or
warning. Usage: check_demo.py RUN_DIR DEMO_LOG"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# tqdm bars ("  0%|", "it/s]"), Python warnings ("UserWarning:", "warnings.warn("), transformers' and PEFT's
# logger lines, and tracebacks: none of them is llama-lora's own output.
BENCH_DATA = Path("../shared/data/benchmarks")  # the Makefile's BENCH_DATA default
NOISE = re.compile(r"\d+%\||it/s\]|s/it\]|Warning:|warnings\.warn\(|^WARNING|Traceback", re.MULTILINE)


def main(run: Path, log: Path) -> int:
    report = json.loads((run / "compare.json").read_text())
    base, adapter = report["base"], report["adapter_metrics"]
    problems = []
    if not adapter["eval_loss"] < base["eval_loss"]:
        problems.append(
            f"held-out eval loss: adapter {adapter['eval_loss']:.4f} >= base {base['eval_loss']:.4f}"
        )
    if not adapter["probe_rate"] > base["probe_rate"]:
        problems.append(
            f"behaviour probe: adapter {adapter['probe_rate']:.2f} <= base {base['probe_rate']:.2f}"
        )
    text = log.read_text(errors="replace").replace("\r", "\n")
    noise = sorted({line.strip()[:120] for line in text.splitlines() if NOISE.search(line)})
    problems += [f"library output in the demo log: {line}" for line in noise]
    print(
        f"demo report ({report['n']} held-out prompts): eval loss {base['eval_loss']:.4f} -> "
        f"{adapter['eval_loss']:.4f}, probe {base['probe_rate']:.2f} -> {adapter['probe_rate']:.2f}, "
        f"ROUGE-L {base['rouge_l']:.3f} -> {adapter['rouge_l']:.3f}, stopped on its own "
        f"{base['stop_rate']:.2f} -> {adapter['stop_rate']:.2f}"
    )
    bench = report.get("benchmarks")
    if bench is None and BENCH_DATA.is_dir():
        problems.append(f"compare.json has no general-skills section although {BENCH_DATA} exists")
    for name, c in (bench or {}).get("comparison", {}).items():
        print(
            f"general skills, {name} ({bench['limit']} rows, {c['metric']}): base {c['base']:.4f} -> adapter "
            f"{c['adapter']:.4f} (delta {c['delta']:+.4f} +- {c['delta_stderr']:.4f}: {c['verdict']})"
        )
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
