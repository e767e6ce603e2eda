"""Memory policy: how much a micro-batch's activations cost, and whether to checkpoint them.

`train.gradient_checkpointing: auto` turns checkpointing on only when the activations of one full
micro-batch (the token budget) would not fit comfortably in the memory that is free once the model is loaded.
Checkpointing costs about a third more compute, so it is off whenever memory allows. See docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes of activations kept for backward, per token, per decoder layer, per unit of (hidden + intermediate)
# width. Set from saved-tensor-hook measurements on SmolLM2-135M (hidden 576, intermediate 1536, DoRA r16 on all
# seven projections, dropout 0.05; figures: bench/RESULTS.md): 36 bytes x 2112 = 76 KB per layer-token, a slight
# overestimate on purpose.
BYTES_PER_WIDTH = 36
# The same with the fused training layers (`train.fused`, fused.py / fused_blocks.py), bf16 base: 18 x 2112 = 38 KB.
BYTES_PER_WIDTH_FUSED = 18
# Fraction of the free memory the activations may take; the rest is for transients (logit chunks, the
# backward's temporaries, allocator slack).
SHARE = 0.5


def activation_bytes_per_token(model_config, fused: bool = False) -> int:
    layers = model_config.num_hidden_layers
    width = model_config.hidden_size + model_config.intermediate_size
    return layers * width * (BYTES_PER_WIDTH_FUSED if fused else BYTES_PER_WIDTH)


def free_memory_bytes(device: str) -> int | None:
    """Memory free for this process's tensors now: CUDA free memory, else available system RAM."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate; without it, no automatic choice
        return None
    return psutil.virtual_memory().available


@dataclass
class CheckpointChoice:
    enabled: bool
    reason: str


def choose_checkpointing(
    setting: bool | str, model_config, budget_tokens: int, device: str, fused: bool = False
):
    """Decide `train.gradient_checkpointing` (true, false or auto) for a micro-batch of `budget_tokens`."""
    if setting != "auto":
        return CheckpointChoice(bool(setting), "set in the config")
    need = activation_bytes_per_token(model_config, fused) * budget_tokens
    free = free_memory_bytes(device)
    if free is None:
        return CheckpointChoice(False, "auto: free memory unknown")
    return CheckpointChoice(
        need > SHARE * free,
        f"auto: activations of a {budget_tokens}-token micro-batch ~{need / 2**30:.1f} GB, "
        f"{free / 2**30:.1f} GB free on {device}",
    )
