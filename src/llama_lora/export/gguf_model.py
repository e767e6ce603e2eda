"""Export a merged Llama-architecture model to GGUF for llama.cpp and Ollama, and verify the file.

The file is written under a temporary name beside the target, loaded back with transformers
(`gguf_file=`), and compared with the source model on probe prompts: tokenizer ids, logits and greedy
tokens. Only a file that passes is renamed into place; `export_report.json` and an Ollama `Modelfile` are
written beside it. The probes, figures, tolerances and the loading back are `verify.py`'s.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llama_lora import run_dir
from llama_lora.export.gguf_meta import ExportError, add_tokenizer, modelfile
from llama_lora.export.verify import (
    PROBES,
    ExportCheckError,
    add_llamacpp,
    chat_ids,
    figures,
    load_gguf_model,
    load_gguf_tokenizer,
    require_passed,
    tokenizer_mismatches,
)
from llama_lora.infer.generate import greedy_probe

TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def source_dir(path: str | Path) -> Path:
    """A merged model directory, or RUN_DIR/merged for a run directory."""
    path = Path(path)
    if (path / "merged" / "config.json").is_file():
        return path / "merged"
    if (path / "config.json").is_file():
        return path
    if (path / "adapter").is_dir() or (path / "config.yaml").is_file():
        raise ExportError(f"{path} has no merged model; run `llama-lora merge {path}` first")
    raise ExportError(f"{path} is neither a run directory nor a model directory (no config.json)")


def check_supported(config) -> None:
    archs = getattr(config, "architectures", None) or [config.model_type]
    if config.model_type != "llama" or archs[0] != "LlamaForCausalLM":
        raise ExportError(
            f"GGUF export supports Llama-architecture models (Llama-3.x, SmolLM2); this model is "
            f"{archs[0]} ({config.model_type}), which is not supported"
        )


def rope_parameters(config) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def llama3_rope_factors(head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, as llama.cpp stores them in `rope_freqs.weight`."""
    base = rope.get("rope_theta", 10000.0)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope["high_freq_factor"]
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_hparams(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType, name: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = rope_parameters(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind not in ("default", "llama3"):  # llama3 scaling travels as the rope_freqs tensor
        raise ExportError(f"rope scaling '{kind}' is not supported by the GGUF export")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rotary layout (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """1-D tensors (norms) stay F32 as llama.cpp keeps them; Q8_0 needs rows divisible by its block."""
    if w.ndim == 1:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return gguf.quants.quantize(w.astype(np.float32), qtype), qtype
    return w.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(src: Path, path: Path, kind: str, log=print) -> dict[str, Any]:
    """Write `src` (a HF Llama directory) as a GGUF file at `path`; returns what was written."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(src)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError) as exc:  # not a model directory, or an incomplete one
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"{src}: not a loadable model directory ({first.strip().rstrip(':')})") from None
    check_supported(config)
    file_type, qtype = TYPES[kind]
    name = str(getattr(config, "_name_or_path", "") or src.name)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_hparams(writer, config, file_type, Path(name).name or src.name)
    pre = add_tokenizer(writer, tokenizer, src, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    rope = rope_parameters(config)
    counts: dict[str, int] = {}
    if rope.get("rope_type") == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        factors = llama3_rope_factors(head_dim, rope)
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        counts["F32"] = 1
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{src}: no .safetensors weights (save the model with safe_serialization=True)")
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied: llama.cpp reuses token_embd
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise ExportError(f"{src}: tensor {key} has no GGUF name for the llama architecture")
                w = f.get_tensor(key).float().numpy()
                if key.endswith("self_attn.q_proj.weight"):
                    w = permute(w, heads)
                elif key.endswith("self_attn.k_proj.weight"):
                    w = permute(w, kv_heads)
                data, dtype = encode(w, qtype)
                writer.add_tensor(gname, data, raw_dtype=dtype)
                counts[dtype.name] = counts.get(dtype.name, 0) + 1
    log(f"writing {sum(counts.values())} tensors ({counts}) to {path} ...")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensor_types": counts, "pre_tokenizer": pre, "rope": rope}


def check_gguf(src: Path, path: Path, kind: str, new_tokens: int, rope: dict[str, Any], log=print) -> dict:
    """The GGUF file at `path` loaded back and probed against its source model `src`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(src)
    tok = load_gguf_tokenizer(path)
    mismatched = tokenizer_mismatches(ref_tok, tok)
    if tok.chat_template != ref_tok.chat_template or chat_ids(tok, PROBES[0]) != chat_ids(ref_tok, PROBES[0]):
        mismatched.append("(chat template rendering)")
    prompts = [chat_ids(ref_tok, p) for p in PROBES]

    log("probing the source model ...")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref_logits, ref_tokens = greedy_probe(model, prompts, new_tokens)  # no stopping
    del model
    log("loading the GGUF file back with transformers and probing it ...")
    model = load_gguf_model(path, rope)
    logits, tokens = greedy_probe(model, prompts, new_tokens)
    del model
    check = figures(ref_logits, ref_tokens, logits, tokens, mismatched, kind)
    check["rope_scaling_from_source"] = rope.get("rope_type") == "llama3"
    check["verifiers"] = ["transformers"]
    return add_llamacpp(check, path, prompts, (ref_logits, ref_tokens), ref_tok, kind, new_tokens, log)


def summary(report: dict[str, Any]) -> str:
    """The CLI's one line about a finished export."""
    return (
        f"wrote {report['gguf']} ({report['type']}, {report['size_bytes'] / 1e6:.0f} MB) in "
        f"{report['runtime_s']:.0f}s: max |logit diff| {report['max_abs_logit_diff']:.2e}, greedy agreement "
        f"{report['greedy_token_agreement']:.0%} ({', '.join(report['verifiers'])}); Modelfile and "
        "export_report.json beside it"
    )


def export_gguf(
    source: str | Path,
    out: str | Path | None = None,
    kind: str = "f16",
    new_tokens: int = 16,
    log=print,
    sidecars: bool = True,
) -> dict[str, Any]:
    """Write, verify and place a GGUF file plus (with `sidecars`) `export_report.json` and a `Modelfile`."""
    from transformers import AutoTokenizer

    if kind not in TYPES:
        raise ExportError(f"--type: {kind} is not one of {', '.join(TYPES)}")
    start = time.perf_counter()
    src = source_dir(source)
    run = Path(source) if src != Path(source) else src
    target = Path(out) if out else run / f"model-{kind}.gguf"
    if target.suffix != ".gguf":
        raise ExportError(f"--out: {target} should end in .gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    with run_dir.atomic_file(target) as tmp:
        written = write_gguf(src, tmp, kind, log=log)
        write_s = time.perf_counter() - start
        check = check_gguf(src, tmp, kind, new_tokens, written.pop("rope"), log=log)
        report = {
            "source": str(src),
            "gguf": str(target),
            "type": kind,
            "size_bytes": tmp.stat().st_size,
            "source_size_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
            **written,
            **check,
            "write_s": round(write_s, 2),
            "runtime_s": round(time.perf_counter() - start, 2),
        }
        text, style = modelfile(target.name, AutoTokenizer.from_pretrained(src))
        report["modelfile_template"] = style
        kept = target.parent / "export_report.json" if sidecars else None
        if kept is not None:
            run_dir.write_json(kept, report)
        require_passed(report, ExportCheckError, "GGUF", target, kept)
    if not sidecars:
        return report
    run_dir.write_text_atomic(target.parent / "Modelfile", text)
    if style is None:
        log("note: the chat template is neither ChatML nor Llama-3; the Modelfile has no TEMPLATE")
    return report
