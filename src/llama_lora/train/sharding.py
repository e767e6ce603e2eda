"""Sharded training (`train.sharding: fsdp`): PyTorch's FSDP2 over the processes of a torchrun launch.

Data parallel (parallel.py) keeps a whole copy of the base on every process; here every decoder layer, and
the rest of the model as one more group, is split with `torch.distributed.fsdp.fully_shard`, so each of the
W processes keeps about 1/W of the frozen base and of the adapter. A layer's parameters are all-gathered
just before its forward (and again for its backward) and freed after; adapter gradients are reduce-scattered
in float32, so each process keeps its shard of the gradient and of AdamW's state.

Precision is the single-process policy, unchanged: the frozen base keeps the storage dtype
`train.precision` gives it (bf16 on a bf16 machine), the adapter stays float32, autocast does the rest;
FSDP all-gathers each parameter in its own dtype (no `param_dtype` cast), so a sharded step computes what
an unsharded step computes. Gradients are reduced in float32.

The root of the sharding is the objective's loss module (sft.ResponseLoss or preference.PreferenceLoss):
its forward is what the loop calls, so the root group (the final norm) is gathered for the whole of a
forward. The frozen embedding and lm_head are not FSDP2's: they are split by vocabulary
(kernels/vocab_parallel.py), so no process ever gathers a vocabulary-sized table.

What the loop needs besides (every one a collective: every process calls it, in the same order):
- `adapter_state` / `optimizer_state`: full (gathered) tensors for checkpoints and the final adapter, in the
  single-process formats (PEFT's adapter file, checkpoint.py's optimizer file);
- `load_adapter_state` / `shard_optimizer_state`: the reverse, for --resume (each process cuts its own shard
  from the full tensors it read; no communication).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llama_lora.errors import ConfigError

__all__ = [
    "shard",
    "adapter_state",
    "load_adapter_state",
    "optimizer_state",
    "shard_optimizer_state",
    "local_bytes",
]


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def check(cfg, device: str) -> None:
    """Refuse, before any slow work, what `train.sharding: fsdp` does not cover (one line each), whatever
    the number of processes (with one, the run goes on unsharded: train() says so)."""
    from llama_lora.model.hardware import resolve_precision

    if resolve_precision(device, cfg.train.precision) == "fp16":  # asked for, or `auto` on a GPU without bf16
        raise ConfigError(
            "train.sharding: fsdp trains in bf16 or fp32 (fp16's loss scaler does not cover sharded "
            "gradients); set train.precision: bf16 or fp32"
        )
    init = cfg.peft.init_lora_weights
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        raise ConfigError(
            f"train.sharding: fsdp does not support peft.init_lora_weights: {init} (its adapter is converted "
            "against the initial one on save); use the default initialisation or train unsharded"
        )


def shard(loss_module: nn.Module, peft_model: nn.Module, device: torch.device) -> None:
    """FSDP2 on every decoder layer, then on `loss_module` (the root: everything else), in place; the frozen
    embedding and lm_head split by vocabulary instead (kernels/vocab_parallel.py), so that the root group
    gathers no vocabulary-sized weight. The model may be on the meta device (the sharded build): then every
    shard is empty until shard_loading.py fills it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from llama_lora.kernels.head import decoder_and_head
    from llama_lora.kernels.vocab_parallel import split

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in decoder_and_head(peft_model)[0].layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    split_by_vocabulary = split(peft_model, mesh)
    fully_shard(loss_module, mesh=mesh, mp_policy=policy, ignored_params=split_by_vocabulary or None)


# glibc's malloc raises its mmap threshold to the size of any mmap()ed block freed (up to 32 MB), after which
# blocks that size come from the heap, which returns memory to the system only from its top. FSDP2 allocates
# and frees every layer's gathered weights (2-32 MB each) twice a step: with the moving threshold the heap
# keeps them, about 500 MB more a step on Llama-3.2-1B (bench/RESULTS.md). A fixed threshold keeps such
# blocks mmap()ed, returned on free. Sharded CPU processes only: elsewhere weights are allocated once.
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def settle_allocator(device: torch.device) -> bool:
    """Fix glibc's mmap threshold in this process (CPU only); False where there is no glibc. mallopt is
    not thread-safe: call it before the process group (and its threads) exists (loop.train does)."""
    libc = _libc() if device.type == "cpu" else None
    return bool(getattr(libc, "mallopt", lambda *_: 0)(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds: its shards where the module is sharded."""
    DTensor = _dtensor()
    total = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    DTensor = _dtensor()
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as `like` (a DTensor) is: this process's shard, computed here (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters gathered to full tensors, keyed as `peft_model.state_dict()` keys
    them: what `save_pretrained(state_dict=...)` takes. On CPU of every process."""
    return {name: _full(p).cpu() for name, p in peft_model.named_parameters() if p.requires_grad}


def load_adapter_state(peft_model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Put an adapter file's full tensors into the sharded trainable parameters. Returns the file keys that
    match no parameter. The file's keys are the parameter names as PEFT's own saving renames them (adapter
    name dropped, DoRA's magnitude key shortened): PEFT is asked for that renaming, with each parameter's
    position standing in for its tensor."""
    from peft import get_peft_model_state_dict

    trainable = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    stand_ins = {name: torch.tensor(i) for i, (name, _) in enumerate(trainable)}
    renamed = get_peft_model_state_dict(peft_model, state_dict=stand_ins)
    params = {key: trainable[int(i)][1] for key, i in renamed.items()}
    unexpected = [k for k in weights if k not in params]
    DTensor = _dtensor()
    with torch.no_grad():
        for key, p in params.items():
            if key not in weights:
                continue
            value = weights[key]
            if isinstance(p, DTensor):
                p.copy_(_local_like(value, p))
            else:
                p.copy_(value.to(device=p.device, dtype=p.dtype))
    return unexpected


def optimizer_state(optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded state tensor gathered to a full CPU tensor."""
    state = optimizer.state_dict()
    return {
        "state": {
            index: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in slots.items()}
            for index, slots in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def shard_optimizer_state(optimizer, state: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Full optimizer state tensors (from a checkpoint) cut to this process's shards of the parameters."""
    DTensor = _dtensor()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, slots in state.items():
        p = params[index]
        out[index] = {
            k: _local_like(v, p)
            if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape)
            else v
            for k, v in slots.items()
        }
    return out
