"""Training speed and memory, side by side in one run.

    python bench/train_speed.py [--quick] [--rows N] [--out bench/results.json]

Trains SmolLM2-135M-Instruct (the embedded model) on the same Alpaca rows three ways, each in its own
process so that peak RSS is that recipe's alone:

  (a) llama-lora, the seed's adapter settings: DoRA r=16, alpha=32, dropout 0.05, all seven projections
  (b) llama-lora, the same with plain LoRA
  (c) the seed recipe reproduced faithfully: transformers Trainer + PEFT DoRA, every row padded to 1024
      tokens, batch 1 x gradient accumulation 8, gradient checkpointing, fp32, lr 2e-5

and reports non-padding tokens/s (prompt included), peak RSS, and the ratios (a)/(c) and (a)/(b).
Data: ../shared/data/alpaca_en_demo.json when present (read in place, never copied), else the bundled demo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def data_rows(n: int) -> tuple[list[dict], str]:
    if SHARED.is_file():
        rows = json.loads(SHARED.read_text())[:n]
        return rows, str(SHARED)
    from llama_lora.data import load_rows

    return load_rows("demo", "train")[:n], "bundled demo data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ workers


def worker_llama_lora(rows_file: str, method: str, out: str) -> dict:
    from llama_lora.config import load_config
    from llama_lora.train import train

    cfg = load_config(
        overrides=[
            "model.name=smollm2-135m-instruct",
            f"data.source={rows_file}",
            "data.format=alpaca",
            "data.template=alpaca",
            "data.max_length=1024",
            "data.eval_fraction=0",
            "peft.r=16",
            "peft.lora_alpha=32",
            "peft.lora_dropout=0.05",
            f"peft.use_dora={str(method == 'dora').lower()}",
            "train.epochs=1",
            "train.save_steps=null",
            "train.logging_steps=1000",
            f"output.dir={out}",
        ]
    )
    summary = train(cfg, overwrite=True, quiet=True).summary
    return {
        "tokens": summary["train_tokens"],
        "seconds": summary["runtime_s"],
        "precision": summary["precision"],
        "steps": summary["steps"],
    }


def worker_seed(rows_file: str, out: str) -> dict:
    """The seed's train.py as written: Trainer, padding='max_length', no EOS, batch 1 x 8, checkpointing."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from llama_lora import models

    path = models.local_path(models.resolve("smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            use_dora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )

    def format_dataset(example):
        prompt = f"### Instruction:\n{example['instruction']}\n"
        prompt += f"### Input:\n{example['input']}\n"
        prompt += f"### Response:\n{example['output']}"
        return tokenizer(prompt, truncation=True, max_length=1024, padding="max_length")

    rows = json.loads(Path(rows_file).read_text())
    ds = Dataset.from_list(rows).map(format_dataset, remove_columns=list(rows[0]))
    tokens = sum(sum(m) for m in ds["attention_mask"])
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        learning_rate=2e-5,
        num_train_epochs=1,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        optim="adamw_torch",
        fp16=False,
        bf16=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    start = time.perf_counter()
    trainer.train()
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "precision": "fp32",
        "steps": trainer.state.global_step,
    }


def run_worker(kind: str, rows_file: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--rows-file", rows_file, "--tmp", out],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rows: a few minutes in all")
    parser.add_argument("--rows", type=int, default=None, help="rows for (a) and (b) (default 64; quick 32)")
    parser.add_argument("--seed-rows", type=int, default=None, help="rows for (c) (default 64; quick 8)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "seed":
            result = worker_seed(args.rows_file, args.tmp)
        else:
            result = worker_llama_lora(args.rows_file, args.worker, args.tmp)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        result["tokens_per_second"] = round(result["tokens"] / result["seconds"], 2)
        print(json.dumps(result))
        return

    n = args.rows or (32 if args.quick else 64)
    n_seed = args.seed_rows or (8 if args.quick else 64)
    rows, origin = data_rows(max(n, n_seed))
    with tempfile.TemporaryDirectory() as tmp:
        main_file, seed_file = Path(tmp) / "rows.json", Path(tmp) / "seed_rows.json"
        main_file.write_text(json.dumps(rows[:n]))
        seed_file.write_text(json.dumps(rows[:n_seed]))
        results = {}
        for kind, label, file in (
            ("dora", "(a) llama-lora DoRA", main_file),
            ("lora", "(b) llama-lora LoRA", main_file),
            ("seed", "(c) seed recipe", seed_file),
        ):
            print(f"running {label} ...", file=sys.stderr, flush=True)
            results[kind] = run_worker(kind, str(file))
            results[kind]["rows"] = n_seed if kind == "seed" else n

    import torch

    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "data": origin,
        "results": results,
        "ratio_a_over_c": round(
            results["dora"]["tokens_per_second"] / results["seed"]["tokens_per_second"], 2
        ),
        "ratio_a_over_b": round(
            results["dora"]["tokens_per_second"] / results["lora"]["tokens_per_second"], 2
        ),
    }
    print(f"\n{'recipe':<24}{'rows':>6}{'tokens/s':>12}{'peak RSS MB':>14}{'precision':>11}")
    for kind, label in (
        ("dora", "(a) llama-lora DoRA"),
        ("lora", "(b) llama-lora LoRA"),
        ("seed", "(c) seed recipe"),
    ):
        r = results[kind]
        print(
            f"{label:<24}{r['rows']:>6}{r['tokens_per_second']:>12.1f}{r['peak_rss_mb']:>14.0f}{r['precision']:>11}"
        )
    print(f"\n(a)/(c) = {report['ratio_a_over_c']}x   (a)/(b) = {report['ratio_a_over_b']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
