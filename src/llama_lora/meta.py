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


def base_fingerprint(model) -> dict[str, Any]:
    """Identifies a base model: its shape and a hash of a corner of its (frozen) embedding matrix."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    corner = emb[:16, :16].detach().float().cpu().contiguous().numpy().tobytes()
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "embedding_sha256": hashlib.sha256(corner).hexdigest()[:16],
    }


def write_meta(directory: Path, config: dict[str, Any], template: str, fingerprint: dict[str, Any]) -> None:
    meta = {"config": config, "template": template, "base_fingerprint": fingerprint}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None
