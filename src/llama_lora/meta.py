"""Self-describing artifacts: `llama_lora.json` in adapter and merged directories.

It carries the resolved config, the prompt template the adapter was trained with, and a fingerprint of the
base model, so `infer`, `merge` and `compare` need nothing the user already told `train`, and an adapter
is never silently applied to a different base model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

META_FILE = "llama_lora.json"


# The config fields that fix a base model's shape; two bases that differ in any of them never share an adapter.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
# The sample: the first 16 rows x 8 columns of the input embedding, as float32 values (6 significant digits).
SAMPLE_ROWS, SAMPLE_COLS = 16, 8
# Storing the base in bf16 (8 significant bits) moves a value by at most 2^-8 of itself, fp16 by 2^-11, and a
# cast back to float32 not at all; two bases with different weights differ by far more than 2^-6 somewhere in
# 128 values. Values below SAMPLE_ATOL (fp16's subnormal range) are compared absolutely.
SAMPLE_RTOL, SAMPLE_ATOL = 2.0**-6, 1e-6


def _embedding_corner(model):
    emb = model.get_input_embeddings().weight
    return emb[:SAMPLE_ROWS, :SAMPLE_COLS].detach().float().cpu()


def base_fingerprint(model) -> dict[str, Any]:
    """Identifies a base model independently of the dtype and device it is loaded in: the config's shape
    fields and a sample of the (frozen) input embedding's values, compared with a tolerance wider than any
    storage dtype's rounding (`fingerprint_matches`)."""
    cfg = model.config
    sample = [float(f"{v:.6g}") for v in _embedding_corner(model).flatten().tolist()]
    return {**{k: getattr(cfg, k, None) for k in SHAPE_FIELDS}, "embedding_sample": sample}


def _legacy_hashes(model) -> set[str]:
    """`embedding_sha256` as adapters written before `embedding_sample` stored it: a hash of the first 16x16
    embedding values in the dtype the base was loaded in, float32 or bf16 (training stored it in bf16)."""
    import torch

    corner = model.get_input_embeddings().weight[:16, :16].detach().float().cpu()
    variants = (corner, corner.to(torch.bfloat16).float(), corner.to(torch.float16).float())
    return {hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] for v in variants}


def fingerprint_matches(stored: dict[str, Any], model) -> bool:
    """Whether `model` is the base that `stored` (from `base_fingerprint`) was taken of, in any dtype."""
    cfg = model.config
    if any(k in stored and stored[k] != getattr(cfg, k, None) for k in SHAPE_FIELDS):
        return False
    if "embedding_sample" in stored:
        import torch

        ours = _embedding_corner(model).flatten()
        theirs = torch.tensor(stored["embedding_sample"], dtype=torch.float32)
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=SAMPLE_RTOL, atol=SAMPLE_ATOL)
    return stored.get("embedding_sha256") in _legacy_hashes(model)


def write_meta(directory: Path, config: dict[str, Any], template: str, fingerprint: dict[str, Any]) -> None:
    meta = {"config": config, "template": template, "base_fingerprint": fingerprint}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None
