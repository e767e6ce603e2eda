"""Checkpoints: `checkpoints/checkpoint-<step>/` with everything that shapes the rest of a run.

    adapter/                 the raw (unconverted) adapter, PEFT format
    optimizer.safetensors    AdamW moments and step counts
    rng.safetensors          torch (CPU and CUDA), python and numpy generator states (+ the torch states of
                             the other processes of a data-parallel run, `rank<r>_torch_*`)
    trainer_state.json       step, scheduler state, optimizer param groups, the loop's counters

Everything tensor-valued is stored as safetensors (never pickle, so loading never runs `torch.load`); the rest
is JSON. A checkpoint is written to a temporary sibling and renamed into place, so a crash mid-save leaves
the previous one intact, and a leftover `.checkpoint-*.tmp-*` directory is never taken for a checkpoint.
Resuming restores all of it, so a resumed run continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from llama_lora import run_dir
from llama_lora.config import flatten
from llama_lora.errors import LlamaLoraError

STATE_FILE = "trainer_state.json"
# Settings that do not change the trained weights: a resumed run may use other values for these.
RESUMABLE_CHANGES = {
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_steps",
    "output.dir",  # the same run, found through another spelling of its path
}


class CheckpointError(LlamaLoraError):
    pass


# ------------------------------------------------------------------------------------------- saving


def optimizer_tensors(optimizer, state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """`optimizer.state_dict()` (or `state`, a sharded run's gathered one) as tensors plus JSON."""
    state = optimizer.state_dict() if state is None else state
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The generator states as tensors (torch, numpy keys) plus JSON (python's, numpy's position)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    info = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), cached]}
    return tensors, info


def save(
    run: Path,
    step: int,
    peft_model,
    optimizer,
    scheduler,
    counters: dict[str, Any],
    scaler=None,
    other_ranks_rng: dict[str, torch.Tensor] | None = None,
    gathered: tuple[dict, dict] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically. `counters` are the loop's running totals (tokens, time, ...);
    `scaler` is the fp16 loss scaler, if any; `other_ranks_rng` from parallel.rng_states; `gathered`: a
    sharded run's full adapter and optimizer state (sharding.adapter_state, sharding.optimizer_state)."""
    target = run / "checkpoints" / f"checkpoint-{step}"
    adapter_state, optimizer_state = gathered or (None, None)
    with run_dir.atomic_dir(target) as tmp:
        # the raw (unconverted) adapter: resuming continues from exactly this state
        peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True, state_dict=adapter_state)
        tensors, meta = optimizer_tensors(optimizer, optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng, meta["rng"] = rng_tensors()
        rng.update(other_ranks_rng or {})
        save_file(rng, str(tmp / "rng.safetensors"))
        meta["scheduler"] = scheduler.state_dict()
        meta["step"] = step
        meta["counters"] = counters
        meta["grad_scaler"] = scaler.state_dict() if scaler is not None else None
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    return target


# ------------------------------------------------------------------------------------------ finding


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (STATE_FILE, "optimizer.safetensors", "rng.safetensors"))


def find(run: Path, name: str | None = None) -> Path:
    """The checkpoint to resume from: the latest complete one in `run`, or the one `name` names
    (`checkpoint-6`, or a path to it, which must lie in `run`)."""
    if name is None:
        found = [p for p in run_dir.checkpoint_dirs(run) if is_complete(p)]
        if not found:
            raise CheckpointError(f"--resume: {run} has no checkpoint to resume from (output.dir)")
        return found[-1]
    path = Path(name)
    if not path.is_dir():
        path = run / "checkpoints" / name
    if not is_complete(path):
        raise CheckpointError(f"--resume: {name} is not a complete checkpoint (no {STATE_FILE} and weights)")
    if path.resolve().parent.parent != run.resolve():
        raise CheckpointError(f"--resume: {name} is not a checkpoint of output.dir {run}")
    return path


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to resume when the config changed in a way that changes the run (see RESUMABLE_CHANGES)."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        key = changed[0]
        raise CheckpointError(
            f"--resume: {key} is {new.get(key)!r} but the run in {where} used {old.get(key)!r}"
            + (f" (and {len(changed) - 1} more changed keys)" if len(changed) > 1 else "")
            + "; resume with the same settings or start a new run with --overwrite"
        )


RESUME_LATEST = "latest"


def resume_point(run: Path, resume: str | None, config: dict[str, Any]) -> Path | None:
    """The checkpoint of `run` to continue from (None for a fresh run); refuses one made with settings other
    than `config` (the resolved config as a dict)."""
    if not resume:
        return None
    found = find(run, None if resume == RESUME_LATEST else resume)
    saved = run / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"--resume: {run} has no config.yaml, so it is not a llama-lora run")
    check_same_run(yaml.safe_load(saved.read_text()), config, run)
    return found


# ------------------------------------------------------------------------------------------ loading


def load_optimizer(path: Path, optimizer, meta: dict[str, Any], sharded: bool = False) -> None:
    """Rebuild the optimizer state dict from optimizer.safetensors + JSON (no pickle) and load it
    (`sharded`: each process keeps its shard of every state tensor)."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(path / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    if sharded:
        from llama_lora.train import sharding

        state = sharding.shard_optimizer_state(optimizer, state)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Put back the generator states `rng_tensors` saved (`tensors`: rng.safetensors, `info`: its JSON part)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def load(
    path: Path,
    peft_model,
    optimizer,
    scheduler,
    scaler=None,
    rank: int = 0,
    device=None,
    sharded: bool = False,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG from checkpoint `path`; returns step and counters.
    In a data-parallel run every process loads the same files; process `rank` (on `device`) then takes
    back its own torch generator state.

    Call it after the model, adapter and optimizer are set up (set-up draws random numbers), so the
    restored generator continues exactly where the saved run stopped: same dropout masks from here on."""
    from peft import set_peft_model_state_dict

    meta = json.loads((path / STATE_FILE).read_text())
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    if sharded:
        from llama_lora.train import sharding

        unexpected = sharding.load_adapter_state(peft_model, weights)
    else:
        unexpected = getattr(set_peft_model_state_dict(peft_model, weights), "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"--resume: {path} holds weights this adapter lacks: {unexpected[0]}")
    load_optimizer(path, optimizer, meta, sharded)
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    restore_rng(rng, meta["rng"])
    if rank:
        from llama_lora.train import parallel

        parallel.restore_rng(rng, rank, torch.device(device or "cpu"))
    return {"step": meta["step"], "counters": meta["counters"]}
