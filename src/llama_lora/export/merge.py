"""Fold a LoRA/DoRA adapter into the base weights and verify the result against the unmerged model.

The merged directory (safetensors, config, generation config, tokenizer with chat template) loads with
plain `transformers.AutoModelForCausalLM`. It is written to a temporary sibling and renamed at the end, so
an interrupted merge never leaves half a model behind; a merge whose check fails is not renamed into place.
The probes, figures and tolerances are `verify.py`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from llama_lora import meta, run_dir
from llama_lora.errors import LlamaLoraError
from llama_lora.export.verify import (
    PROBES,
    TOLERANCE,
    merge_failure,
    merge_figures,
    require_passed,
    run_probes,
)
from llama_lora.infer import loading


class MergeError(LlamaLoraError):
    exit_code = 1


def fold(loaded: loading.Loaded, dtype: str):
    """The adapter merged into the base weights, cast to `dtype`, stopping where `loaded` stops."""
    merged_model = loaded.model.merge_and_unload()
    merged_model.to(getattr(torch, dtype))
    gen_cfg = merged_model.generation_config
    gen_cfg.eos_token_id = loaded.stop_ids if len(loaded.stop_ids) > 1 else loaded.stop_ids[0]
    if gen_cfg.pad_token_id is None and loaded.tokenizer.pad_token_id is not None:
        gen_cfg.pad_token_id = loaded.tokenizer.pad_token_id
    return merged_model


def save(folder: Path, merged_model, loaded: loading.Loaded) -> None:
    """The merged model, its tokenizer and llama_lora.json, in `folder`."""
    src = loaded.source
    assert src is not None
    merged_model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    cfg_dump = src.cfg.model_dump(mode="json") if src.cfg else {}
    meta.write_meta(folder, cfg_dump, loaded.template, meta.base_fingerprint(merged_model))


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
    before = run_probes(loaded, PROBES, probe_tokens)
    merged_model = fold(loaded, chosen)

    with run_dir.atomic_dir(target) as tmp:
        save(tmp, merged_model, loaded)
        del merged_model, loaded.model
        log("reloading the merged model with plain transformers and probing it ...")
        reloaded = loading.load(base=str(tmp), device=device, template=loaded.template, log=log)
        after = run_probes(reloaded, PROBES, probe_tokens)
        report = {
            "adapter": str(src.adapter_dir),
            "base_model": src.base_name,
            "dtype": chosen,
            "probes": len(PROBES),
            "probe_new_tokens": probe_tokens,
            **merge_figures(*before, *after, chosen),
            "runtime_s": round(time.perf_counter() - start, 2),
            "merged_dir": str(target),
        }
        run_dir.write_json(tmp / "merge_report.json", report)
        kept = None
        if not report["passed"]:
            kept = target.parent / f"{target.name}.merge_report.json"
            run_dir.write_json(kept, report)
        require_passed(report, MergeError, "merge", target, kept, merge_failure)
    return report
