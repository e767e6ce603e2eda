"""What the hardware supports and what `auto` becomes: the device, the precision (bf16 only where the CPU or
GPU computes it natively), and the dtype the frozen base is stored in."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llama_lora.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from llama_lora.config import ModelConfig, TrainConfig


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    if sys.platform.startswith("linux"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def resolve_device(requested: str) -> str:
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device")
    if requested == "mps" and not mps:
        raise ConfigError("train.device: mps requested but this machine has no MPS (Apple-silicon) device")
    return requested


def resolve_precision(device: str, requested: str) -> str:
    """CUDA: bf16 where supported else fp16 (never both); MPS: fp32; CPU: bf16 with native support."""
    import torch

    if requested != "auto":
        if requested == "fp16" and device != "cuda":
            raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 or fp32)")
        if requested == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision: this CUDA device has no bf16 support (use fp16)")
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def storage_dtype(mcfg: ModelConfig, precision: str) -> torch.dtype:
    """dtype of the frozen base weights: the compute dtype under bf16/fp16 autocast, else float32.

    A frozen base gains nothing from float32 storage under autocast: every matmul casts its weight to the
    compute dtype anyway, on every forward and backward. Storing it in that dtype skips those casts and halves
    the weights' memory; the residual stream then runs in bf16 too (norms and softmax still upcast inside).
    Adapters and their optimizer state stay float32. Measured on CPU (SmolLM2-135M, DoRA): same speed, less
    peak RSS (bench/RESULTS.md).
    """
    import torch

    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def describe_device(tcfg: TrainConfig) -> tuple[str, str]:
    device = resolve_device(tcfg.device)
    return device, resolve_precision(device, tcfg.precision)
