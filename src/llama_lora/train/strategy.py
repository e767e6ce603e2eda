"""Topology behind one object: how a run's processes hold the model and step it together.

The loop (loop.py) calls the same members whatever the launch is, as Fabric keeps LitGPT's `fit()` free of
DDP/FSDP branches:

    shard_model  before the optimizer exists (build.attach): FSDP2 splits the model here, others keep it
    prepare      the module and optimizer as the loop will drive them (accelerate's DDP wrapper, or as is)
    forward_backward  one micro-batch: the forward, the scaled backward, gradient sync on the last one only
    clip         the gradient norm (the norm of sharded gradients is torch's own)
    eval_sums    this process's evaluation batches (sharded: padded so every process runs as many forwards)
    gather       the full adapter and optimizer state for checkpoints and adapter/ (None: the model has it)
    release      after the last forward (FSDP2 keeps its root group gathered after a forward)

`Replicated` is one process or data parallel (a whole copy of the model everywhere, parallel.py's step
plan); `Sharded` is `train.sharding: fsdp` over several processes (sharding.py). Every member that talks to
other processes is called by all of them, in the same order.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from llama_lora.train import parallel, sharding
from llama_lora.train.objectives.sft import eval_sums


def make_accelerator(device: str, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # each run in a process gets its own device/precision settings; safe under torchrun too, since
    # accelerate only creates the process group when none exists
    AcceleratorState._reset_state(True)
    return Accelerator(cpu=device == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision))


class Replicated:
    """One process, or data parallel through accelerate (DDP): every process holds the whole model."""

    sharded = False
    name = "none"  # train_summary.json's "sharding"

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def shard_model(self, loss_module: torch.nn.Module, peft_model, device: str) -> None:
        """Nothing to split: each process keeps its copy."""

    def prepare(self, module, optimizer, load_in_4bit: bool):
        # a 4-bit model already sits on its GPU and cannot be moved
        return self.accelerator.prepare(module, optimizer, device_placement=[not load_in_4bit, True])

    def forward_backward(self, module, batch: dict, scale: float, last: bool) -> torch.Tensor:
        acc = self.accelerator
        with parallel.sync_unless_last(acc, module, last=last):
            loss_sum, _ = module(**batch)
            acc.backward(loss_sum * scale)
        return loss_sum

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip to `max_norm`; the gradients' norm before clipping (logged as grad_norm)."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def eval_sums(self, module, batches: list[dict], mine: list[dict], objective) -> tuple[float, int]:
        return eval_sums(module, mine, self.accelerator.device)

    def gather(self, peft_model, optimizer) -> tuple[dict, dict] | None:
        return None  # the model and optimizer hold full tensors already

    def release(self, module) -> None:
        pass


class Sharded(Replicated):
    """FSDP2 over the launch's processes: each holds about 1/W of every layer (sharding.py)."""

    sharded = True
    name = "fsdp"

    def shard_model(self, loss_module: torch.nn.Module, peft_model, device: str) -> None:
        sharding.shard(loss_module, peft_model, torch.device(device))

    def prepare(self, module, optimizer, load_in_4bit: bool):
        return module, optimizer  # FSDP2 placed and wrapped the model already; no DDP, no wrapper

    def forward_backward(self, module, batch: dict, scale: float, last: bool) -> torch.Tensor:
        module.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch only, as DDP does
        with self.accelerator.autocast():  # what accelerate's prepare() wraps an unsharded forward in
            loss_sum, _ = module(**batch)
        (loss_sum * scale).backward()
        return loss_sum

    def clip(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2

    def eval_sums(self, module, batches: list[dict], mine: list[dict], objective) -> tuple[float, int]:
        acc = self.accelerator
        with acc.autocast():
            # every forward gathers weights from all processes: all run as many
            spare = -(-len(batches) // acc.num_processes) - len(mine)
            if spare:
                eval_sums(module, batches[:1] * spare, acc.device)
                objective.take_metrics("eval")  # what the spare forwards measured: dropped
            return eval_sums(module, mine, acc.device)

    def gather(self, peft_model, optimizer) -> tuple[dict, dict]:
        return sharding.adapter_state(peft_model), sharding.optimizer_state(optimizer)

    def release(self, module) -> None:
        module.reshard()


def choose(cfg, accelerator, device: str, say) -> tuple[Any, Replicated]:
    """The strategy for this launch (and the config, `train.sharding` set where accelerate's FSDP version 2
    config asks for it). `train.sharding: fsdp` is checked first whatever the process count."""
    if parallel.check_supported(accelerator):  # accelerate's FSDP version 2 config
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"sharding": "fsdp"})})
    if cfg.train.sharding != "fsdp":
        return cfg, Replicated(accelerator)
    sharding.check(cfg, device)
    if accelerator.num_processes == 1:
        say("train.sharding: fsdp with one process: nothing to shard, training unsharded")
        return cfg, Replicated(accelerator)
    return cfg, Sharded(accelerator)


def peak_memory_mb(device: str) -> dict[str, float]:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    out = {"peak_rss_mb": round(rss_mb, 1)}
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["peak_memory_mb"] = out.get("peak_cuda_mb", out["peak_rss_mb"])
    return out


def gather_peaks(accelerator, device: str, model) -> list[dict[str, float]]:
    """`peak_memory_mb` of every process, in rank order (every process takes part), with the megabytes of
    model parameters the process holds (a sharded run: its shards)."""
    from llama_lora.train.sharding import local_bytes

    mine = {**peak_memory_mb(device), "parameters_mb": round(local_bytes(model) / 2**20, 2)}
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])
