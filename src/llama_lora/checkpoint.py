"""Checkpoints: `checkpoints/checkpoint-<step>/` with the adapter, optimizer and scheduler state.

Everything tensor-valued is stored as safetensors (never pickle); the rest is JSON. A checkpoint is written
to a temporary sibling and renamed into place, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama_lora import run_dir


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save(run: Path, step: int, peft_model, optimizer, scheduler) -> Path:
    target = run / "checkpoints" / f"checkpoint-{step}"
    with run_dir.atomic_dir(target) as tmp:
        # the raw (unconverted) adapter: resuming continues from exactly this state
        peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        tensors, meta = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta["scheduler"] = scheduler.state_dict()
        meta["step"] = step
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1, default=str))
    return target
