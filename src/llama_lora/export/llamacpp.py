"""llama.cpp as a second verifier of GGUF exports, used when `llama_cpp` (llama-cpp-python) is importable.

The exported file (a model, or a base model plus a LoRA adapter) is loaded by llama.cpp itself; its
tokenization of the probe texts and its logits and greedy tokens on the probe prompts are compared with the
source's through `export.figures`, under the same tolerances as the transformers check. Install with
`pip install 'llama-lora[llamacpp]'` (it builds llama.cpp from source the first time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check(
    model_path: Path,
    prompts: list[list[int]],
    ref_logits: list[torch.Tensor],
    ref_tokens: list[list[int]],
    tokenizer,
    kind: str,
    new_tokens: int,
    lora_path: Path | None = None,
) -> dict[str, Any]:
    """Figures as `export.figures` gives them, or `{"passed": False, "error": ...}` if llama.cpp cannot load
    the file(s). `prompts` are token ids; `tokenizer` is the source's (HF) tokenizer."""
    import llama_cpp

    from llama_lora.export.gguf_model import TOKENIZER_PROBES, figures

    n_ctx = max(512, max(len(p) for p in prompts) + new_tokens + 8)
    try:
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            n_gpu_layers=0,
            logits_all=True,  # scores for every prompt position, not only the last
            verbose=False,
        )
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError with llama.cpp's complaint
        return {"passed": False, "error": f"llama.cpp could not load {model_path.name}: {exc}"}
    # the probe texts as plain text, and the rendered prompts (their special tokens parsed as such)
    texts = TOKENIZER_PROBES + [tokenizer.decode(ids) for ids in prompts]
    wanted = [tokenizer.encode(t, add_special_tokens=False) for t in TOKENIZER_PROBES] + prompts
    mismatched = [
        t for t, ids in zip(texts, wanted) if llm.tokenize(t.encode(), add_bos=False, special=True) != ids
    ]
    logits, tokens = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
        out: list[int] = []
        for _ in range(new_tokens):  # greedy, no stopping, like generate.greedy_probe
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) < new_tokens:
                llm.eval([out[-1]])
        tokens.append(out)
    del llm  # frees llama.cpp's context and weights now
    return figures(ref_logits, ref_tokens, logits, tokens, mismatched, kind)
