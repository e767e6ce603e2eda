"""Derived training settings, resolved once: what `auto` and the machine make of the config.

`resolve(cfg, model_config, device, precision)` turns the config and the base model's config into one frozen
`Settings` (device and precision come from `hardware.describe_device`, asked once by the caller, which needs them
to load the base): the device, the precision, the storage dtype of the frozen base, the micro-batch token budget, the CPU fast path
(fused layers, packing), and whether gradient checkpointing is on and why. Training logs it once, writes it
into `train_summary.json` and passes it on; nothing downstream reads `train.device`, `train.precision`,
`train.fused`, `train.packing`, `train.max_batch_tokens` or `train.gradient_checkpointing` again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llama_lora.config import Config
from llama_lora.kernels.fastpath import FastPath
from llama_lora.model import hardware
from llama_lora.train import memory

# `train.max_batch_tokens: auto`, per device (docs/memory.md; measured: bench/RESULTS.md)
AUTO_BATCH_TOKENS = {"cuda": 8192, "mps": 1024, "cpu": 1024}


@dataclass(frozen=True)
class Settings:
    device: str
    precision: str  # fp32, bf16 or fp16
    storage_dtype: str  # of the frozen base: float32, bfloat16, float16, or 4-bit (QLoRA)
    batch_tokens: int | None  # token budget of one micro-batch; None: rows x longest, unbounded
    fast_path: FastPath
    gradient_checkpointing: bool
    checkpointing_reason: str

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    def describe(self) -> str:
        """The one log line (after the model line) that says what was chosen."""
        parts = [
            f"device {self.device}",
            f"precision {self.precision}",
            f"base stored in {self.storage_dtype}",
            f"micro-batches of up to {self.batch_tokens} tokens"
            if self.batch_tokens
            else "unbounded micro-batches",
            self.fast_path.describe(),
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'} ({self.checkpointing_reason})",
        ]
        return "; ".join(p for p in parts if p)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["fast_path"] = asdict(self.fast_path)
        return out


def batch_tokens(cfg: Config, device: str) -> int | None:
    """The micro-batch token budget; `auto` picks one per device."""
    budget = cfg.train.max_batch_tokens
    return AUTO_BATCH_TOKENS.get(device, 1024) if budget == "auto" else budget


def resolve(cfg: Config, model_config, device: str, precision: str) -> Settings:
    """The settings for training `cfg` on a base whose config is `model_config`, on `device` in `precision`
    (`hardware.describe_device(cfg.train)`, resolved once by the caller: the base is loaded in that precision
    before this runs). Call it once the base is loaded: `auto` gradient checkpointing weighs the activations
    against the memory free at that point."""
    fast = FastPath.choose(cfg.train, device)
    budget = batch_tokens(cfg, device)
    longest = budget or cfg.train.batch_size * cfg.data.max_length
    choice = memory.choose_checkpointing(
        cfg.train.gradient_checkpointing, model_config, longest, device, fast.fused
    )
    storage = "4-bit" if cfg.model.load_in_4bit else str(hardware.storage_dtype(cfg.model, precision))
    return Settings(
        device=device,
        precision=precision,
        storage_dtype=storage.removeprefix("torch."),
        batch_tokens=budget,
        fast_path=fast,
        gradient_checkpointing=choice.enabled,
        checkpointing_reason=choice.reason,
    )
