"""DPO training speed: llama-lora against TRL's DPOTrainer, on the same pairs, model and adapter settings.

    python bench/dpo_speed.py [--rows 64] [--rounds 1] [--max-batch-tokens auto] [--trl-gradient-checkpointing]
                              [--trl-dtype bfloat16] [--out results.json]

SmolLM2-135M-Instruct (the embedded model), the first --rows pairs of the bundled demo pairs
(src/llama_lora/demo_data/pairs/train.jsonl), on the CPU. Both sides: LoRA r=16, alpha=32, dropout 0, all seven
projections, no DoRA; DPO beta 0.1 (sigmoid loss); lr 1e-4, cosine schedule, 5% warmup; batches of up to 8
pairs; 1 epoch; max_length 512 per sequence; bf16 autocast; the chat template applied to the prompt and
answers; no evaluation, no checkpoints, no trackers; torch's default threads. Each side runs in its own process:

  llama-lora  `python -m llama_lora train --quiet --preset dpo-demo data.max_rows=N ...` (the CLI, run in a
              wrapper process that only times the one-time reference precompute). The base is stored in bf16;
              the reference log-probs are computed once, before training (llama-lora's design), and the
              preset's token budget (`train.max_batch_tokens: auto`, 1024 on a CPU) may split a batch of 8
              pairs into smaller steps (--max-batch-tokens null keeps 8 pairs a step, as TRL does).
  TRL         DPOTrainer with `peft_config=LoraConfig(...)` on the model loaded with --trl-dtype (default bf16,
              as llama-lora stores it; PEFT keeps the adapter in fp32), DPOConfig(bf16=True, use_cpu=True),
              TRL's defaults otherwise: the reference log-probs computed at every step (adapter disabled), no
              precompute. TRL's own default gradient_checkpointing=True is turned off unless
              --trl-gradient-checkpointing (llama-lora's `auto` leaves it off for this model on the CPU).

Reported per side: the training time (llama-lora: train_summary.json `runtime_s`, the step loop only, without the
reference precompute, which is shown apart; TRL: `trainer.train()`), the whole process's wall time (imports,
model load, tokenization, precompute included), the non-padding tokens of both sequences of every pair
(prompt + chosen and prompt + rejected, as each side tokenized them), tokens/s over the training time, and the
last logged training loss. With --rounds N the sides alternate N times and the median round is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "src" / "llama_lora" / "demo_data" / "pairs" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, LR, BETA, MAX_LENGTH, WARMUP = 8, 1e-4, 0.1, 512, 0.05  # the dpo-demo preset's values


def model_dir() -> str:
    from llama_lora.model import loader

    return loader.local_path(loader.resolve("smollm2-135m-instruct"), log=lambda *a: None)


def first_pairs(n: int) -> list[dict]:
    with PAIRS.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


# ------------------------------------------------------------------------------------------ workers


def side_llama_lora(rows: int, tmp: str, max_batch_tokens: str) -> dict:
    """The CLI in this process, with the reference precompute timed from outside (nothing else changed)."""
    import torch

    from llama_lora import cli
    from llama_lora.train.objectives.preference import PreferenceObjective

    precompute = [0.0]
    original = PreferenceObjective.precompute_reference

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            precompute[0] += time.perf_counter() - start

    PreferenceObjective.precompute_reference = timed
    run = Path(tmp) / "run"
    sys.argv = ["llama-lora", "train", "--quiet", "--preset", "dpo-demo"] + [
        f"data.max_rows={rows}",
        "data.eval_split=null",
        "data.eval_fraction=0",
        "train.epochs=1",
        "train.eval_steps=null",
        "train.save_steps=null",
        "train.logging_steps=1",
        f"train.max_batch_tokens={max_batch_tokens}",
        f"output.dir={run}",
        "--overwrite",
    ]
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code:
            raise
    summary = json.loads((run / "train_summary.json").read_text())
    return {
        "train_s": summary["runtime_s"],
        "precompute_s": round(precompute[0], 2),
        "tokens": summary["train_tokens"],
        "steps": summary["steps"],
        "final_loss": summary["train_loss"],
        "precision": summary["precision"],
        "gradient_checkpointing": summary["gradient_checkpointing"],
        "threads": torch.get_num_threads(),
    }


def side_trl(rows: int, tmp: str, dtype: str, gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = model_dir()
    pairs = first_pairs(rows)
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    args = DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,  # a float below 1: a ratio of the steps, as llama-lora's warmup_ratio
        beta=BETA,
        max_length=MAX_LENGTH,
        bf16=True,
        use_cpu=True,
        gradient_checkpointing=gradient_checkpointing,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=TARGETS,
        use_dora=False,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config
    )
    tokens = sum(
        min(len(r["prompt_ids"]) + len(r[side]), MAX_LENGTH)  # the collator truncates each sequence
        for r in trainer.train_dataset
        for side in ("chosen_ids", "rejected_ids")
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "train_s": round(seconds, 2),
        "precompute_s": None,
        "tokens": tokens,
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "precision": f"bf16 autocast, weights {dtype}",
        "gradient_checkpointing": gradient_checkpointing,
        "threads": torch.get_num_threads(),
    }


def run_side(side: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--side", side, "--rows", str(args.rows), "--tmp", tmp]
        cmd += ["--result", str(result_file), "--max-batch-tokens", args.max_batch_tokens]
        cmd += ["--trl-dtype", args.trl_dtype]
        cmd += ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(result_file.read_text())
    result["wall_s"] = round(wall, 2)
    result["tokens_per_s"] = round(result["tokens"] / result["train_s"], 2)
    return result


# ------------------------------------------------------------------------------------------- driver


SIDES = (("llama-lora", "llama-lora"), ("trl", "TRL DPOTrainer"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64, help="the first N demo pairs (default 64)")
    parser.add_argument("--rounds", type=int, default=1, help="run both sides N times, alternating")
    parser.add_argument(
        "--max-batch-tokens",
        default="auto",
        help="llama-lora's train.max_batch_tokens (default the preset's auto; null: 8 pairs a step)",
    )
    parser.add_argument(
        "--trl-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="dtype TRL's model is loaded in (default bfloat16, as llama-lora stores the base)",
    )
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="keep DPOConfig's own default gradient_checkpointing=True (off otherwise, as llama-lora here)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--side", choices=[s for s, _ in SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        if args.side == "trl":
            result = side_trl(args.rows, args.tmp, args.trl_dtype, args.trl_gradient_checkpointing)
        else:
            result = side_llama_lora(args.rows, args.tmp, args.max_batch_tokens)
        Path(args.result).write_text(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {side: [] for side, _ in SIDES}
    for round_ in range(args.rounds):
        for side, label in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            print(f"round {round_ + 1}: {label} ...", file=sys.stderr, flush=True)
            runs[side].append(run_side(side, args))
    results = {}
    for side, side_runs in runs.items():
        ordered = sorted(side_runs, key=lambda r: r["tokens_per_s"])
        results[side] = {
            **ordered[(len(ordered) - 1) // 2],
            "runs_tokens_per_s": [r["tokens_per_s"] for r in side_runs],
        }
    ratio = results["llama-lora"]["tokens_per_s"] / results["trl"]["tokens_per_s"]

    print(f"\nDPO, SmolLM2-135M-Instruct, {args.rows} demo pairs, CPU, median of {args.rounds} round(s)")
    print(
        f"{'side':<16}{'steps':>6}{'train s':>9}{'precomp s':>10}{'wall s':>8}{'tokens':>8}"
        f"{'tokens/s':>10}{'final loss':>11}"
    )
    for side, label in SIDES:
        r = results[side]
        pre = "-" if r["precompute_s"] is None else f"{r['precompute_s']:.1f}"
        print(
            f"{label:<16}{r['steps']:>6}{r['train_s']:>9.1f}{pre:>10}{r['wall_s']:>8.1f}{r['tokens']:>8}"
            f"{r['tokens_per_s']:>10.1f}{r['final_loss']:>11.4f}"
        )
    if args.rounds > 1:
        for side, label in SIDES:
            print(f"{label} tokens/s of each round: {results[side]['runs_tokens_per_s']}")
    for side, label in SIDES:
        r = results[side]
        print(
            f"{label}: precision {r['precision']}, gradient checkpointing {r['gradient_checkpointing']}, "
            f"{r['threads']} torch threads"
        )
    print(f"\nllama-lora / TRL tokens/s = {ratio:.2f}x")
    if args.out:
        report = {"rows": args.rows, "rounds": args.rounds, "results": results, "ratio": round(ratio, 3)}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
