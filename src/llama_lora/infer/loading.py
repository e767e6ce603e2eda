"""Inference: load base / base + adapter / merged model, render prompts like training did, generate.

The prompt template comes from the run that trained the adapter (`config.yaml` in the run directory, or
`llama_lora.json` inside the adapter or merged directory), so training and inference never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_lora import run_dir
from llama_lora.config import Config, ModelConfig, load_config
from llama_lora.data import templates
from llama_lora.data.templates import stop_token_ids
from llama_lora.errors import LlamaLoraError
from llama_lora.meta import fingerprint_matches, read_meta
from llama_lora.model import adapters, hardware, loader


class InferenceError(LlamaLoraError):
    pass


@dataclass
class AdapterSource:
    adapter_dir: Path
    run_dir: Path | None
    cfg: Config | None
    template: str | None
    fingerprint: dict[str, Any] | None
    base_name: str


def find_adapter(path: str | Path) -> AdapterSource:
    """A run directory (with adapter/) or an adapter directory (with adapter_config.json)."""
    adapter = run_dir.adapter_dir_of(path)
    if adapter is None:
        raise InferenceError(
            f"--adapter: {path} is neither a run directory nor an adapter directory (no adapter_config.json)"
        )
    run = run_dir.run_of(adapter)
    meta = read_meta(adapter) or {}
    cfg = (
        load_config(run / "config.yaml")
        if run is not None
        else (Config.model_validate(meta["config"]) if "config" in meta else None)
    )
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = cfg.model.name if cfg is not None else adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise InferenceError(
            f"--adapter: {adapter} does not say which base model it was trained for; pass --base"
        )
    return AdapterSource(adapter, run, cfg, meta.get("template"), meta.get("base_fingerprint"), base)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: str
    system_prompt: str | None
    device: str
    description: str
    source: AdapterSource | None = None
    stop_ids: list[int] = field(default_factory=list)
    stored_dtype: str = "float32"  # dtype of the base weights on disk
    tools: list[dict[str, Any]] | None = None  # --tools schemas, rendered as training renders them
    precision: str = "fp32"  # generation's decode steps: "bf16" runs them on bf16 weights (infer/decode.py)
    # the bf16 decoder (copies of the weights), made at the first generation and reused; whoever changes the
    # weights (compare unmerging the adapter) drops it
    decoder: Any = None


def load(
    base: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    template: str | None = None,
    trust_remote_code: bool = False,
    merge_in_memory: bool = True,
    log=print,
    precision: str = "fp32",
) -> Loaded:
    """Base alone (`base`), base + adapter (`adapter`, base from its run unless `base` overrides),
    or a merged model directory (`base`).

    With `merge_in_memory` the adapter is folded into the weights in place (reversibly, PEFT's
    `merge_adapter`): generation then costs what the base model costs, instead of PEFT's DoRA recomputing
    every weight norm for every generated token (much slower on CPU, measured: bench/RESULTS.md).

    `precision` (auto, bf16 or fp32) is generation's: the weights load in float32 either way; "bf16" (and
    "auto" where the hardware computes bf16 natively, as training decides) decodes on bf16 copies."""
    if base is None and adapter is None:
        raise InferenceError("give --adapter RUN_DIR (or an adapter directory) or --base MODEL")
    src = find_adapter(adapter) if adapter else None
    name = base or (src.base_name if src else None)
    assert name is not None
    dev = hardware.resolve_device(device)
    decoding = generation_precision(precision, dev)
    mcfg = ModelConfig(name=name, trust_remote_code=trust_remote_code)
    if src is not None and src.cfg is not None and base is None:
        mcfg = src.cfg.model
    ref = loader.resolve(mcfg.name)
    tokenizer = loader.load_tokenizer(mcfg, ref)
    stored = loader.stored_dtype(mcfg, ref)
    model = loader.load_model(mcfg, torch.float32, ref)
    merged_meta = read_meta(Path(loader.local_path(ref, log=log))) if ref.kind == "local" else None
    cfg = src.cfg if src else (Config.model_validate(merged_meta["config"]) if merged_meta else None)
    description = mcfg.name
    if src is not None:
        model = _with_adapter(model, src, mcfg, merge_in_memory)
        description = f"{mcfg.name} + adapter {src.adapter_dir}"
    chosen = (
        template
        or (src.template if src and src.template else None)
        or (merged_meta.get("template") if merged_meta else None)
    )
    if chosen is None and cfg is not None:
        chosen = cfg.data.template
    chosen = templates.choose_template(tokenizer, chosen or "auto")
    model.to(dev).eval()
    system = cfg.data.system_prompt if cfg is not None else None
    stops = stop_token_ids(tokenizer, model)
    return Loaded(model, tokenizer, chosen, system, dev, description, src, stops, stored, precision=decoding)


def _with_adapter(model, src: AdapterSource, mcfg: ModelConfig, merge_in_memory: bool):
    """The base with the adapter of `src` on it (refused when trained on another base), folded in or not."""
    loader.refuse_pickled(src.adapter_dir, mcfg.allow_pickle, key="--adapter")
    if src.fingerprint is not None and not fingerprint_matches(src.fingerprint, model):
        raise InferenceError(
            f"--adapter: {src.adapter_dir} was trained for a different base model than {mcfg.name} "
            f"(trained on {src.base_name}; shapes or weights differ). Use that base or drop --base."
        )
    try:
        model = adapters.load_adapter(model, src.adapter_dir)
    except RuntimeError as exc:  # size mismatch: an adapter made for another architecture
        raise InferenceError(
            f"--adapter: {src.adapter_dir} does not fit {mcfg.name}: {str(exc).splitlines()[0]}"
        ) from None
    if merge_in_memory:
        model.merge_adapter()
    return model


def generation_precision(requested: str, device: str) -> str:
    """ "bf16" or "fp32" for generation's decode steps: `auto` is bf16 where training would choose it (the
    hardware computes it natively), else float32 (fp16 on older CUDA devices decodes in float32 too)."""
    if requested not in ("auto", "bf16", "fp32"):
        raise InferenceError(f"--precision: {requested!r} is not one of auto, bf16, fp32")
    chosen = hardware.resolve_precision(device, "auto") if requested == "auto" else requested
    return "bf16" if chosen == "bf16" else "fp32"
