"""Data parallel on accelerate (`torchrun` / `accelerate launch`): who runs what, and global sums.

Every process builds the same micro-batch plan (deterministic from the seed). With W processes one optimizer
step takes W x grad_accum micro-batches, so the effective batch grows with W as in every DDP trainer, and
process r runs micro-batches r, r+W, r+2W, ... of the step's group. Each process can count the group's
labelled tokens N itself (it has the whole plan), and backpropagates `loss_sum * W / N`: DDP averages the
gradients over the W processes, so the result is the gradient of the step's summed loss over N, exactly
what one process gets from the same group with grad_accum = W x grad_accum.

With one process everything here is the identity: no communication, no copies.
"""

from __future__ import annotations

import contextlib
import math

import torch

from llama_lora.errors import LlamaLoraError


class ParallelError(LlamaLoraError):
    pass


# Set-ups the loop does not run: DeepSpeed's engines and the others own the model and optimizer; FSDP version 1
# wraps the model in flat parameters. FSDP version 2 is `train.sharding: fsdp` (sharding.py).
UNSUPPORTED = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM", "XLA": "XLA/TPU"}


def check_supported(accelerator) -> bool:
    """Data parallel (one process or many) or FSDP version 2; say so before any slow work. True when the
    accelerate config asks for FSDP version 2 (the run is then sharded as with `train.sharding: fsdp`)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind == "FSDP":
        if getattr(accelerator, "is_fsdp2", False):
            return True
        raise ParallelError(
            "accelerate config: FSDP version 1 is not supported by llama-lora's training loop; set "
            "fsdp_version: 2 in the accelerate config (or use torchrun with train.sharding: fsdp). "
            "See docs/multi_gpu.md"
        )
    if kind in UNSUPPORTED:
        raise ParallelError(
            f"accelerate config: {UNSUPPORTED[kind]} is not supported by llama-lora's training loop (it "
            "owns the model and optimizer); use data parallel (distributed_type: MULTI_GPU, or torchrun) or "
            "FSDP version 2 (train.sharding: fsdp), and model.load_in_4bit: true for a base that does not "
            "fit one GPU. See docs/multi_gpu.md"
        )
    return False


def my_share(group: list[list[int]], rank: int, world: int) -> list[tuple[list[int], float]]:
    """This process's (micro-batch, weight) pairs of a step's group.

    Every process gets the same number of pairs, so each takes part in every gradient all-reduce. Only a
    short last group leaves a slot without a micro-batch of its own; that slot re-runs the group's first
    micro-batch with weight 0 (it adds nothing but still joins the all-reduce)."""
    slots = math.ceil(len(group) / world)
    share = []
    for k in range(slots):
        j = rank + k * world
        share.append((group[j], 1.0) if j < len(group) else (group[0], 0.0))
    return share


def sync_unless_last(accelerator, module, last: bool):
    """DDP all-reduces gradients on every backward; accumulate locally until a process's last micro-batch."""
    return contextlib.nullcontext() if last else accelerator.no_sync(module)


def sum_across(accelerator, *values: float) -> list[float]:
    """Each value summed over all processes (one all-reduce); the values themselves with one process."""
    if accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


def rng_states(accelerator) -> dict[str, torch.Tensor]:
    """The torch generator states of the processes other than the main one (the main one's are saved as
    usual), keyed `rank<r>_torch_cpu` / `rank<r>_torch_cuda`, so a resumed run draws the same dropout masks
    on every process. Every process must call this (it gathers); empty with one process."""
    if accelerator.num_processes == 1:
        return {}
    from accelerate.utils import gather_object

    mine = {"torch_cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        mine["torch_cuda"] = torch.cuda.get_rng_state(accelerator.device)
    states = gather_object([mine])
    return {f"rank{r}_{k}": v for r, state in enumerate(states) if r > 0 for k, v in state.items()}


def restore_rng(states: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    """Put back this process's generator state saved by `rng_states` (nothing for the main process)."""
    if f"rank{rank}_torch_cpu" in states:
        torch.set_rng_state(states[f"rank{rank}_torch_cpu"])
    if f"rank{rank}_torch_cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states[f"rank{rank}_torch_cuda"], device)
