"""llama.cpp as a second verifier of GGUF exports, used when `llama_cpp` (llama-cpp-python) is importable.

The exported file (a model, or a base model plus a LoRA adapter) is loaded by llama.cpp itself, which
tokenizes the probe texts and gives its logits and greedy tokens on the probe prompts. This module only runs
llama.cpp; `verify.llamacpp_figures` compares what it returns with the source's, under the same tolerances
as the transformers check. Install with `pip install 'llama-lora[llamacpp]'` (it builds llama.cpp from
source the first time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch


class LoadError(Exception):
    """llama.cpp could not load the file(s); the message carries its complaint."""


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def probe(
    model_path: Path,
    prompts: list[list[int]],
    texts: list[str],
    new_tokens: int,
    lora_path: Path | None = None,
) -> tuple[list[list[int]], list[torch.Tensor], list[list[int]]]:
    """llama.cpp's token ids for `texts` (special tokens parsed as such), and its logits over each of the
    `prompts` (token ids) with `new_tokens` greedy tokens after it, no stopping, like `generate.greedy_probe`.
    Raises `LoadError` if llama.cpp cannot load the file(s)."""
    import llama_cpp

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
        raise LoadError(f"llama.cpp could not load {model_path.name}: {exc}") from exc
    ids = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    logits, tokens = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32)))
        out: list[int] = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) < new_tokens:
                llm.eval([out[-1]])
        tokens.append(out)
    del llm  # frees llama.cpp's context and weights now
    return ids, logits, tokens
