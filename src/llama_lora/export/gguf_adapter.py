"""Export a LoRA adapter as a GGUF adapter for llama.cpp (`--lora`) and Ollama (`ADAPTER`), verified.

llama.cpp's adapter format (its `convert_lora_to_gguf.py`): `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for each adapted weight the base tensor's GGUF name plus `.lora_a` (PEFT's
lora_A, shape (r, in)) and `.lora_b` (lora_B, (out, r)). llama.cpp adds `alpha / r * B @ A` to the weight,
so `alpha` is chosen to make that PEFT's scaling. The base GGUF stores q/k rows permuted (`export.permute`);
since perm(W + s B A) = perm(W) + s perm(B) A, lora_b of q_proj/k_proj gets the same row permutation.

The check: the base GGUF and the adapter file are read back, the adapter applied to the base as llama.cpp
applies it (transformers' GGUF loader un-permutes q/k of base and delta alike), and the result compared with
the PEFT model (base + adapter, unmerged) on the probe prompts, under `export gguf`'s tolerances; also in
llama.cpp when `llama_cpp` is importable (`llamacpp.py`), all through `verify.py`. Only files that pass are
renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llama_lora import run_dir
from llama_lora.export.gguf_meta import ExportError, modelfile
from llama_lora.export.gguf_model import check_supported, export_gguf, permute, rope_parameters
from llama_lora.export.verify import (
    PROBES,
    ExportCheckError,
    add_llamacpp,
    figures,
    load_gguf_model,
    load_gguf_tokenizer,
    render_probes,
    require_passed,
    tokenizer_mismatches,
)
from llama_lora.infer import generate, loading
from llama_lora.model import loader

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEY = re.compile(r"base_model\.model\.(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")
# adapter_config.json keys whose non-empty values change what the adapter computes beyond W + s * B @ A
UNMAPPABLE = {
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "replicated layers (layer_replication)",
    "target_parameters": "adapted parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
}
FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0"}  # general.file_type -> the tolerance `export gguf` uses


def check_mappable(adapter_dir: Path, cfg: dict[str, Any], keys: list[str]) -> None:
    """Refuse, in one line, an adapter llama.cpp's LoRA format cannot express."""
    if cfg.get("use_dora"):
        raise ExportError(
            f"{adapter_dir} is a DoRA adapter, and llama.cpp has no DoRA: run `llama-lora merge RUN_DIR`, "
            "then `llama-lora export gguf RUN_DIR` for a merged GGUF instead"
        )
    what = [text for key, text in UNMAPPABLE.items() if cfg.get(key)]
    if cfg.get("peft_type", "LORA") != "LORA":
        what.append(f"a {cfg['peft_type']} adapter, not LoRA")
    if cfg.get("bias", "none") != "none":
        what.append(f"trained biases (bias: {cfg['bias']})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        what.append(f"an unconverted {init} adapter (it applies to a modified base)")
    odd = sorted({k for k in keys if not (m := KEY.fullmatch(k)) or m.group(2) not in LLAMA_PROJECTIONS})
    if odd:
        what.append(
            f"tensors outside the 7 Llama projections ({', '.join(odd[:3])}{', ...' * (len(odd) > 3)})"
        )
    if what:
        raise ExportError(
            f"{adapter_dir} cannot be written as a llama.cpp LoRA adapter: it has {'; '.join(what)}. "
            "Run `llama-lora merge` and `llama-lora export gguf` instead"
        )


def gguf_alpha(cfg: dict[str, Any]) -> float:
    """`adapter.lora.alpha` such that llama.cpp's alpha / r equals PEFT's scaling (alpha / sqrt(r) for rsLoRA)."""
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def write_adapter(
    tensors: dict[str, torch.Tensor], config, alpha: float, path: Path, name: str
) -> dict[str, Any]:
    """Write PEFT's lora_A/lora_B `tensors` for the Llama `config` as a llama.cpp LoRA adapter at `path`."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    modules = sorted({KEY.fullmatch(k).group(1) for k in tensors}, key=_layer_order)  # type: ignore[union-attr]
    for module in modules:
        a = tensors[f"base_model.model.{module}.lora_A.weight"].float().numpy()  # (r, in)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].float().numpy()  # (out, r)
        if module.endswith("q_proj"):
            b = permute(b, heads)
        elif module.endswith("k_proj"):
            b = permute(b, kv_heads)
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise ExportError(f"adapter tensor {module} has no GGUF name for the llama architecture")
        writer.add_tensor(gname + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(gname + ".lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"adapted_weights": len(modules), "rank": int(a.shape[0]), "lora_alpha_gguf": alpha}


def _layer_order(module: str) -> tuple[int, str]:
    return int(module.split(".")[2]), module


def apply_adapter(model, path: Path) -> None:
    """Add a GGUF LoRA adapter to a model loaded from the base GGUF, as llama.cpp applies it: W += alpha/r B A,
    the delta un-permuted by transformers' own GGUF tensor processor (as it un-permutes the base's q/k)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    data = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    params = dict(model.named_parameters())
    hf_name = {names.get_name(k, try_suffixes=(".weight",)): k for k in params}
    heads = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads}
    processor = LlamaTensorProcessor(config=heads)
    for name in data:
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        a, b = data[name], data[base + ".lora_b"]
        delta = processor.process((alpha / a.shape[0]) * (b @ a), base).weights
        with torch.no_grad():
            params[hf_name[base]] += torch.from_numpy(np.ascontiguousarray(delta))


def check_adapter(loaded, base: Path, adapter: Path, kind: str, new_tokens: int, log=print) -> dict[str, Any]:
    """The PEFT model vs the base GGUF with the GGUF adapter applied, in transformers (and llama.cpp)."""
    ref_tok = loaded.tokenizer
    prompts = render_probes(loaded, PROBES)
    tok = load_gguf_tokenizer(base)
    mismatched = tokenizer_mismatches(ref_tok, tok)
    mismatched += [
        f"(prompt {i})"
        for i, ids in enumerate(prompts)
        if tok.encode(ref_tok.decode(ids), add_special_tokens=False) != ids
    ]
    log("probing the adapter (base + adapter, unmerged) ...")
    ref_logits, ref_tokens = generate.greedy_probe(loaded.model, prompts, new_tokens)  # no stopping
    log("applying the GGUF adapter to the base GGUF in transformers and probing it ...")
    model = load_gguf_model(base, rope_parameters(loaded.model.config))
    base_logits, _ = generate.greedy_probe(model, prompts[:1], 1)
    apply_adapter(model, adapter)
    logits, tokens = generate.greedy_probe(model, prompts, new_tokens)
    del model
    check = figures(ref_logits, ref_tokens, logits, tokens, mismatched, kind)
    # how far the adapter moves the base: the check above is only meaningful if this is large
    check["adapter_effect_max_abs_logit_diff"] = float((base_logits[0] - ref_logits[0]).abs().max())
    check["verifiers"] = ["transformers"]
    reference = (ref_logits, ref_tokens)
    return add_llamacpp(check, base, prompts, reference, ref_tok, kind, new_tokens, log, lora_path=adapter)


def base_kind(path: Path) -> str:
    field = gguf.GGUFReader(path).fields.get("general.file_type")
    return FILE_TYPES.get(int(field.contents()), "q8_0") if field is not None else "q8_0"


def base_model_dir(loaded) -> Path:
    """The local directory of the base the adapter was trained on (what `export gguf` converts)."""
    src = loaded.source
    ref = loader.resolve(src.cfg.model.name if src.cfg is not None else src.base_name)
    if ref.kind == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, local_files_only=True))  # loading.load fetched it
    return Path(loader.local_path(ref, log=lambda *a: None))


def _from_line(path: Path, folder: Path) -> str:
    return f"./{path.name}" if path.parent.resolve() == folder.resolve() else str(path.resolve())


def read_adapter(src: loading.AdapterSource) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter's config and PEFT tensors, refused in one line if llama.cpp cannot express them."""
    from safetensors.torch import load_file

    cfg = json.loads((src.adapter_dir / "adapter_config.json").read_text())
    weights = src.adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(
            f"{src.adapter_dir}: no adapter_model.safetensors (save the adapter as safetensors)"
        )
    tensors = load_file(weights)
    check_mappable(src.adapter_dir, cfg, list(tensors))
    return cfg, tensors


def targets(
    src: loading.AdapterSource, out: str | Path | None, base_gguf: str | Path | None
) -> tuple[Path, Path]:
    """Where the adapter goes, and the base GGUF it applies to (given, or written beside it)."""
    target = Path(out) if out else (src.run_dir or src.adapter_dir.parent) / "gguf-adapter" / "adapter.gguf"
    if target.suffix != ".gguf":
        raise ExportError(f"--out: {target} should end in .gguf")
    base = Path(base_gguf) if base_gguf else target.with_name("base-f16.gguf")
    if base_gguf and (base.suffix != ".gguf" or not base.is_file()):
        raise ExportError(f"--base-gguf: {base} is not a .gguf file")
    return target, base


def write_modelfile(base: Path, target: Path, tokenizer) -> None:
    """The Ollama Modelfile beside `target`: FROM the base GGUF, ADAPTER the adapter, then the chat format."""
    text, _ = modelfile(base.name, tokenizer)
    lines = text.splitlines()
    lines[0:1] = [f"FROM {_from_line(base, target.parent)}", f"ADAPTER {_from_line(target, target.parent)}"]
    run_dir.write_text_atomic(target.parent / "Modelfile", "\n".join(lines) + "\n")


def export_gguf_adapter(
    run: str | Path,
    out: str | Path | None = None,
    base_gguf: str | Path | None = None,
    new_tokens: int = 16,
    log=print,
) -> dict[str, Any]:
    """Write and verify `adapter.gguf` (and, without `base_gguf`, `base-f16.gguf`), `Modelfile` and
    `export_report.json`, in `RUN_DIR/gguf-adapter/` unless `out` says where."""
    start = time.perf_counter()
    src = loading.find_adapter(run)
    cfg, tensors = read_adapter(src)
    target, base = targets(src, out, base_gguf)
    loaded = loading.load(adapter=str(run), device="cpu", merge_in_memory=False, log=log)
    config = loaded.model.config
    check_supported(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"adapter": str(src.adapter_dir), "gguf": str(target), "base_gguf": str(base)}
    # the base is renamed into place first, and only with the adapter; a given base is only read
    placed_base = run_dir.atomic_file(base) if base_gguf is None else contextlib.nullcontext(base)
    with run_dir.atomic_file(target) as tmp, placed_base as base_path:
        if base_gguf is None:
            log(f"writing the base model as GGUF ({base.name}) ...")
            base_report = export_gguf(
                base_model_dir(loaded), base_path, "f16", new_tokens, log, sidecars=False
            )
            report["base_check"] = {k: v for k, v in base_report.items() if k not in ("gguf", "source")}
        written = write_adapter(tensors, config, gguf_alpha(cfg), tmp, src.adapter_dir.parent.name)
        kind = "f16" if base_gguf is None else base_kind(base)
        check = check_adapter(loaded, base_path, tmp, kind, new_tokens, log)
        report |= {"base_written": base_gguf is None, "base_type": kind, "lora_alpha": cfg["lora_alpha"]}
        report |= {"use_rslora": bool(cfg.get("use_rslora")), **written, "size_bytes": tmp.stat().st_size}
        report |= {**check, "runtime_s": round(time.perf_counter() - start, 2)}
        run_dir.write_json(target.parent / "export_report.json", report)
        require_passed(report, ExportCheckError, "GGUF adapter", target, target.parent / "export_report.json")
    write_modelfile(base, target, loaded.tokenizer)
    return report


def summary(report: dict[str, Any]) -> str:
    """The CLI's one line about a finished export."""
    return (
        f"wrote {report['gguf']} ({report['size_bytes'] / 1e3:.0f} kB, {report['adapted_weights']} weights, "
        f"rank {report['rank']}) for {report['base_gguf']} in {report['runtime_s']:.0f}s: max |logit diff| "
        f"{report['max_abs_logit_diff']:.2e}, greedy agreement {report['greedy_token_agreement']:.0%} "
        f"({', '.join(report['verifiers'])}); Modelfile and export_report.json beside it"
    )
