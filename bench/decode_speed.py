"""Single-stream decode speed: llama-lora's generation against llama.cpp on the same merged weights.

    python bench/decode_speed.py RUN_DIR [--tokens 128] [--repeat 3] [--llama-python PYTHON]

RUN_DIR needs `merged/` (`llama-lora merge RUN_DIR`) and `model-f16.gguf` (`llama-lora export gguf RUN_DIR`):
the same weights, ours in float32 safetensors, llama.cpp's in f16. Each side runs in a process of its own, one
after another, on the same prompt token ids (a short chat prompt rendered as `infer` renders it), greedy, 2
threads: one warm-up, then `--repeat` timed runs of exactly `--tokens` new tokens (no stop at the end-of-turn
token, as llama.cpp's `generate` loop does not stop either), prefill included. Reports tokens/s per run and
each side's median as a ratio to llama.cpp's. The sides:
- `llama.cpp f16`: llama-cpp-python, when `--llama-python` (default: this Python) can import `llama_cpp`; the
  bench installs nothing and says so when it cannot;
- `engine bf16`: `infer`'s path where the CPU computes bf16 natively (infer/decode.py);
- `transformers fp32`: `infer --precision fp32` (transformers' `generate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Give three tips for staying healthy."


def prompt_ids(merged: Path) -> list[int]:
    from llama_lora.infer import generate, loading

    loaded = loading.load(base=str(merged), device="cpu", log=lambda *a: None)
    return generate.render_prompt(loaded, [{"role": "user", "content": PROMPT}])


def ours(merged: Path, precision: str, ids: list[int], tokens: int, repeat: int) -> list[float]:
    import torch

    from llama_lora.infer import loading
    from llama_lora.infer.engine import Engine
    from llama_lora.infer.generate import GenerationSettings

    torch.set_num_threads(2)
    loaded = loading.load(base=str(merged), device="cpu", log=lambda *a: None, precision=precision)

    def once(n: int) -> float:
        start = time.perf_counter()
        if precision == "bf16":
            engine = Engine(loaded.model, stop_ids=[], slots=1, precision="bf16")
            (seq,) = engine.generate([ids], GenerationSettings(max_new_tokens=n))
            made = len(seq.tokens)
        else:
            with torch.no_grad():
                out = loaded.model.generate(
                    input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False
                )
            made = out.shape[1] - len(ids)
        assert made == n, made
        return n / (time.perf_counter() - start)

    once(16)
    return [once(tokens) for _ in range(repeat)]


def llama_cpp(gguf: Path, ids: list[int], tokens: int, repeat: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_threads=2, n_ctx=1024, verbose=False)

    def once(n: int) -> float:
        start, made = time.perf_counter(), 0
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            made += 1
            if made >= n:
                break
        return n / (time.perf_counter() - start)

    once(16)
    return [once(tokens) for _ in range(repeat)]


def run_side(python: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--llama-python", default=sys.executable, help="a Python that can import llama_cpp")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    merged, gguf = args.run_dir / "merged", args.run_dir / "model-f16.gguf"
    if args.side:
        ids = json.loads(args.ids)
        if args.side == "llama.cpp":
            rates = llama_cpp(gguf, ids, args.tokens, args.repeat)
        else:
            rates = ours(merged, args.side, ids, args.tokens, args.repeat)
        print(json.dumps({"tokens_per_s": [round(r, 1) for r in rates]}))
        return
    for needed, how in ((merged, "llama-lora merge"), (gguf, "llama-lora export gguf")):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run `{how} {args.run_dir}` first")
    ids = prompt_ids(merged)
    common = ["--tokens", str(args.tokens), "--repeat", str(args.repeat), "--ids", json.dumps(ids)]
    sides = {}
    probe = subprocess.run([args.llama_python, "-c", "import llama_cpp"], capture_output=True)
    if probe.returncode == 0:
        sides["llama.cpp f16"] = run_side(
            args.llama_python, [str(args.run_dir), "--side", "llama.cpp", *common]
        )
    else:
        print(
            f"llama_cpp cannot be imported by {args.llama_python}: the llama.cpp side is skipped",
            file=sys.stderr,
        )
    sides["engine bf16"] = run_side(sys.executable, [str(args.run_dir), "--side", "bf16", *common])
    sides["transformers fp32"] = run_side(sys.executable, [str(args.run_dir), "--side", "fp32", *common])
    reference = sides.get("llama.cpp f16", {}).get("tokens_per_s")
    for result in sides.values():
        if "tokens_per_s" in result:
            result["median"] = statistics.median(result["tokens_per_s"])
            if reference:
                result["vs_llama_cpp"] = round(result["median"] / statistics.median(reference), 2)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"avx512_bf16: {'avx512_bf16' in lscpu}",
        "prompt_tokens": len(ids),
        "new_tokens": args.tokens,
        "sides": sides,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
