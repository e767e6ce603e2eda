"""The training fast path (docs/fused.md) as one object: choose it from the config, install, collate, uninstall.

Three independent pieces, each installed on one model instance and removed again, none process-wide:

- ``fused``: fused LoRA/DoRA projections (fused.py) and fused RMSNorm/SwiGLU (fused_blocks.py), instance
  ``forward`` overrides that apply in training mode with gradients only;
- ``packing``: padding-free micro-batches (packing.py): :meth:`FastPath.collate` packs the rows, and the model's
  attention implementation becomes llama-lora's, which keeps attention within each row;
- ``grouped_kv`` (CPU): padded batches keep grouped key/value heads in SDPA (attention.py), via a flag on the
  model's attention modules.

:meth:`FastPath.uninstall` removes all three: the model is plain PEFT/transformers again (forward, attention
implementation, saving, merging), e.g. the model ``train()`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from llama_lora.config import TrainConfig
from llama_lora.data import encoding
from llama_lora.data.batching import collate
from llama_lora.kernels import attention, fused, fused_blocks, packing, row_attention

__all__ = ["FastPath"]


@dataclass(frozen=True)
class FastPath:
    fused: bool  # fused LoRA/DoRA projections + fused RMSNorm/SwiGLU
    packing: bool  # padding-free packed micro-batches with per-row attention
    grouped_kv: bool  # grouped k/v heads in SDPA for padded batches (CPU)

    @classmethod
    def choose(cls, tcfg: TrainConfig, device: str) -> FastPath:
        """``train.fused`` (auto: on for the CPU, where it was measured) and ``train.packing`` (auto: as fused).

        Grouped k/v heads go with the fused layers on the CPU, as before the key existed. Preference
        objectives pack too (both answers of every pair of a micro-batch in one sequence, sums taken per row).
        Sharded runs (``train.sharding: fsdp``) take it as unsharded ones do: FSDP2 gathers each decoder
        layer's weights before its forward, whichever forward that is.
        """
        on = device == "cpu" if tcfg.fused == "auto" else bool(tcfg.fused)
        packed = on if tcfg.packing == "auto" else bool(tcfg.packing)
        return cls(fused=on, packing=packed, grouped_kv=on and device == "cpu")

    def install(self, peft_model, model, layers: ModuleType = fused) -> None:
        """Install on ``peft_model`` and its base ``model``. ``layers``: the fused-projection module
        (bench/paired_steps.py swaps in another version of fused.py)."""
        if self.fused:
            layers.install(peft_model)
            fused_blocks.install(peft_model)
        if self.grouped_kv:
            attention.set_grouped_kv(model, True)
        if self.packing or self.grouped_kv:  # both live in llama-lora's attention function
            row_attention.enable(model)

    def collate(self, rows: list[encoding.Example], pad_id: int) -> dict[str, torch.Tensor]:
        """A training micro-batch: packed rows (``packing``) or the usual right-padded batch."""
        return packing.collate_packed(rows) if self.packing else collate(rows, pad_id)

    def uninstall(self, peft_model, model, layers: ModuleType = fused) -> None:
        """Undo :meth:`install` (a no-op for pieces that are not installed); ``layers`` as given to install."""
        layers.uninstall(peft_model)
        fused_blocks.uninstall(peft_model)
        attention.set_grouped_kv(model, False)
        row_attention.disable(model)

    def describe(self) -> str:
        """For the one set-up log line, e.g. ``fused training layers, packed batches, grouped k/v heads``."""
        parts = [
            name
            for on, name in (
                (self.fused, "fused training layers"),
                (self.packing, "packed batches"),
                (self.grouped_kv, "grouped k/v heads"),
            )
            if on
        ]
        return ", ".join(parts) if parts else "PEFT's forward, padded batches"
