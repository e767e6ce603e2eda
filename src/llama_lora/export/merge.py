"""Fold a LoRA/DoRA adapter into the base weights and verify the result against the unmerged model.

The merged directory (safetensors, config, generation config, tokenizer with chat template) loads with
plain `transformers.AutoModelForCausalLM`. It is written to a temporary sibling and renamed at the end, so
an interrupted merge never leaves half a model behind; a merge whose check fails is not renamed into place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llama_lora import meta, run_dir
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import generate, loading

PROBES = [
    "Who are you?",
    "Give me three tips for writing a clear email.",
    "What is the boiling point of water at sea level?",
    "Translate 'good morning' into French.",
]
# Max |logit difference| allowed between merged and unmerged models, by the merged weights' dtype.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.25}
MIN_AGREEMENT = {"float32": 1.0, "bfloat16": 0.9, "float16": 0.95}


class MergeError(LlamaLoraError):
    exit_code = 1


def run_probes(
    loaded: loading.Loaded, prompts: list[str], new_tokens: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """`generate.greedy_probe` on `prompts` rendered as user turns, stopping where generation would."""
    ids = [generate.render_prompt(loaded, [{"role": "user", "content": p}]) for p in prompts]
    return generate.greedy_probe(loaded.model, ids, new_tokens, loaded.stop_ids)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of greedy tokens that agree position by position (up to the first divergence counts)."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        total += n
        for i in range(min(len(x), len(y))):
            if x[i] != y[i]:
                break
            same += 1
    return same / total if total else 1.0


def merge(
    adapter: str,
    out: Path | None = None,
    dtype: str = "auto",
    base: str | None = None,
    device: str = "auto",
    probe_tokens: int = 24,
    log=print,
) -> dict[str, Any]:
    start = time.perf_counter()
    loaded = loading.load(base=base, adapter=adapter, device=device, merge_in_memory=False, log=log)
    src = loaded.source
    assert src is not None
    target = Path(out) if out else (src.run_dir or src.adapter_dir.parent) / "merged"
    chosen = loaded.stored_dtype if dtype == "auto" else dtype
    if chosen not in TOLERANCE:
        raise MergeError(f"--dtype: {chosen} is not one of {', '.join(TOLERANCE)}")

    log(f"probing the unmerged model ({loaded.description}) ...")
    before_logits, before_tokens = run_probes(loaded, PROBES, probe_tokens)
    merged_model = loaded.model.merge_and_unload()
    merged_model.to(getattr(torch, chosen))
    gen_cfg = merged_model.generation_config
    gen_cfg.eos_token_id = loaded.stop_ids if len(loaded.stop_ids) > 1 else loaded.stop_ids[0]
    if gen_cfg.pad_token_id is None and loaded.tokenizer.pad_token_id is not None:
        gen_cfg.pad_token_id = loaded.tokenizer.pad_token_id

    with run_dir.atomic_dir(target) as tmp:
        merged_model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        cfg_dump = src.cfg.model_dump(mode="json") if src.cfg else {}
        meta.write_meta(tmp, cfg_dump, loaded.template, meta.base_fingerprint(merged_model))
        del merged_model, loaded.model
        log("reloading the merged model with plain transformers and probing it ...")
        reloaded = loading.load(base=str(tmp), device=device, template=loaded.template, log=log)
        after_logits, after_tokens = run_probes(reloaded, PROBES, probe_tokens)
        diff = max(float((a - b).abs().max()) for a, b in zip(before_logits, after_logits))
        agree = agreement(before_tokens, after_tokens)
        report = {
            "adapter": str(src.adapter_dir),
            "base_model": src.base_name,
            "dtype": chosen,
            "probes": len(PROBES),
            "probe_new_tokens": probe_tokens,
            "max_abs_logit_diff": diff,
            "greedy_token_agreement": agree,
            "tolerance": TOLERANCE[chosen],
            "min_agreement": MIN_AGREEMENT[chosen],
            "passed": diff <= TOLERANCE[chosen] and agree >= MIN_AGREEMENT[chosen],
            "runtime_s": round(time.perf_counter() - start, 2),
            "merged_dir": str(target),
        }
        run_dir.write_json(tmp / "merge_report.json", report)
        if not report["passed"]:
            kept = target.parent / f"{target.name}.merge_report.json"
            run_dir.write_json(kept, report)
            raise MergeError(
                f"merge check failed: max |logit diff| {diff:.3g} (tolerance {TOLERANCE[chosen]}), greedy "
                f"agreement {agree:.2%} (need {MIN_AGREEMENT[chosen]:.0%}); nothing written to {target} "
                f"(report in {kept})"
            )
    return report
