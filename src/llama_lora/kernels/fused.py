"""Fused training forward/backward for PEFT's LoRA and DoRA ``Linear`` layers: one autograd node per projection.

PEFT builds an adapted projection out of several autograd nodes (base linear, dropout, ``lora_A``, ``lora_B``,
the add or DoRA's rescaling), and each keeps its own inputs for backward: per projection the dropout mask and
the dropped-out input (both the size of the input, in the activation dtype), the base output and the LoRA
output (both the size of the output, for DoRA's magnitude gradient). ``q``, ``k`` and ``v`` read the same
input but each keeps its own copies. :class:`FusedLoraLinear` computes the same layer with the same arithmetic
and keeps only what its backward needs:

- the layer input itself (one tensor shared by every projection that reads it: ``q``/``k``/``v``,
  ``gate``/``up``);
- the positions of the dropped elements (int32, about ``4 * p`` bytes per input element instead of a 2-byte
  mask plus the 2-byte dropped input), and the rank-``r`` ``A @ drop(x)``;
- for DoRA, the layer output (which the next operation usually keeps anyway: attention keeps ``v``, the MLP
  keeps ``gate`` and ``up``), from which the magnitude gradient is recovered: with ``g = m / ||W'||``,
  ``out = g * z + bias`` and ``d loss / d m = sum_tokens(d_out * z) / ||W'|| = sum_tokens(d_out * (out - bias)) / m``.

Forward, with ``s`` the LoRA scaling, ``k`` the keep-mask and ``q = 1 / P(keep)``::

    u = (x * k) @ (q * A)^T                # rank r
    z = x @ W^T + s * u @ B^T               # one addmm onto the base output
    out = z (+ bias)                        # LoRA
    out = z + z * (g - 1) + bias            # DoRA: g - 1 rounded to the activation dtype, as in fast_dora

Backward (``W`` and ``bias`` frozen)::

    gz = d_out (* g)        gu = s * gz @ B        dx = gz @ W + k * (gu @ (q * A))
    dA = q * gu^T @ (x * k)   dB = s * gz^T @ u    dm = sum(d_out * (out - bias)) / m

``dm``'s product is taken and summed in the activation dtype (the reduction accumulates in float32), without a
float32 copy of the activation-sized product; the bf16 result is as close to a float32 run as PEFT's
(tests/test_fast_dora.py).

Dropout is applied to the LoRA branch input only, as in :mod:`llama_lora.fast_dora` (for plain LoRA that *is*
PEFT's formula; for DoRA see that module). The dropped elements come from :func:`drop_positions`: each
element independently with probability ``p``, drawn as geometric gaps between dropped elements (about ``n * p``
uniforms instead of ``n``), and kept elements are scaled by ``1 / (1 - p)``, so the layer stays unbiased. The
draws come from torch's default generator (seeded, saved and restored with checkpoints like every other random
number here), but not the same numbers as ``nn.Dropout``: runs are reproducible, not bit-identical to PEFT's
dropout. Dropping is a copy of the input with ``index_fill_`` at those positions (see bench/RESULTS.md).

With dropout 0 or in eval mode the outputs and gradients equal PEFT's (float32: 1e-5; tests/test_fused.py).
The layer falls back to PEFT's own forward whenever it cannot apply: not training, no gradient, merged or
disabled adapters, several active adapters, per-row ``adapter_names``, a trainable or quantized base weight,
a bias on ``lora_B``, dropout 1, PEFT's DoRA variant (``peft.fast_dora: false``), or a zero magnitude entry.
Parameters and saved adapters are untouched (plain PEFT format).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.nn import functional as F

from llama_lora.model.fast_dora import FastDoraLinearVariant, _is_plain_float_weight, dora_weight_norm

__all__ = ["FusedLoraLinear", "drop_positions", "install", "uninstall", "installed"]


def drop_positions(n: int, p: float, device: torch.device | str) -> torch.Tensor:
    """Sorted flat indices (int64) of the elements dropped among ``n``, each one independently with probability ``p``.

    Drawn as the gaps of a Bernoulli process: the distance from one dropped element to the next is geometric,
    ``1 + floor(log(U) / log(1 - p))`` for a float32 ``U`` uniform in ``[2**-24, 1)`` from torch's default
    generator (five operators per draw, the floor taken by the conversion to integers). That is
    about ``n * p`` uniforms instead of one random word per element (faster than drawing a dense mask, measured:
    bench/RESULTS.md), and the indices are ~20x smaller to keep for backward than a 1-byte mask. Exact up to float32 rounding: gaps beyond ``log(2**-24) / log(1 - p)`` (probability 6e-8)
    are cut to that length.
    """
    if p <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(n, device=device)
    mean = n * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)  # enough to pass n but for ~1e-9 of draws
    inv_log_keep = 1.0 / math.log1p(-p)
    parts, start = [], 0
    while True:
        # U in [2**-24, 1): log U is finite. 1 + gap = trunc(log U / log(1 - p) + 1), the ratio being >= 0
        steps = torch.empty(count, device=device).uniform_(2.0**-24, 1.0)
        steps = steps.log_().mul_(inv_log_keep).add_(1.0).to(torch.int64)
        pos = steps.cumsum_(0).add_(start - 1)  # the k-th dropped index: sum of the first k steps - 1
        inside = int(torch.searchsorted(pos, n))
        parts.append(pos[:inside])
        if inside < count:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        start = int(pos[-1]) + 1


def _zeroed(t: torch.Tensor, positions: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """``t`` with the elements at the flat ``positions`` set to 0 (a copy unless ``inplace``); ``None``: ``t``."""
    if positions is None:
        return t
    out = t if inplace else t.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, positions.to(torch.int64), 0)
    return out


class FusedLoraLinear(torch.autograd.Function):
    """``out = g * (x W^T + s * B A drop(x)) + bias`` (``g = m / norm`` for DoRA, 1 for LoRA), one node.

    x: (..., in). weight (out, in) and bias (out,) frozen. lora_a (r, in), lora_b (out, r), magnitude (out,) or
    None. ``norm``: DoRA's detached row norms (float32) or None. ``dtype``: the compute dtype (autocast's, or
    the weights' without autocast). Autocast is off inside; inputs are cast explicitly.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling, p, dtype):
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w = weight.to(dtype)
            drop = drop_positions(x2.numel(), p, x.device) if p > 0 else None
            keep_scale = 1.0 / (1.0 - p)
            a = (lora_a * keep_scale).to(dtype) if keep_scale != 1.0 else lora_a.to(dtype)
            b = lora_b.to(dtype)
            u = F.linear(_zeroed(x2, drop), a)
            dora = magnitude is not None
            bias_c = bias.to(dtype) if bias is not None else None
            z = F.linear(x2, w, None if dora else bias_c)
            z.addmm_(u, b.t(), alpha=scaling)
            if dora:
                g = magnitude.detach().to(norm.dtype) / norm
                gm1 = (g - 1.0).to(dtype)
                out = z.addcmul_(z, gm1)
                if bias_c is not None:
                    out.add_(bias_c)
            else:
                gm1 = None
                out = z
            out = out.view(*shape[:-1], out.shape[-1])
        ctx.dtype, ctx.scaling, ctx.keep_scale, ctx.x_dtype = dtype, scaling, keep_scale, x.dtype
        # a and b are the rank-r weights already scaled and cast: tiny, and backward needs them again
        if drop is not None and x2.numel() < 2**31:
            drop = drop.to(torch.int32)  # half the memory; widened again in backward
        ctx.save_for_backward(x2, drop, u, out if dora else None, weight, bias, a, b, magnitude, gm1)
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        x2, drop, u, out, weight, bias, a, b, magnitude, gm1 = ctx.saved_tensors
        a_dtype, b_dtype = ctx.adapter_dtypes
        dtype, s, q = ctx.dtype, ctx.scaling, ctx.keep_scale
        need_x, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        with torch.autocast(d_out.device.type, enabled=False):
            out_features = b.shape[0]
            dz = d_out.reshape(-1, out_features).to(dtype)
            gz = torch.addcmul(dz, dz, gm1) if gm1 is not None else dz
            gu = torch.mm(gz, b).mul_(s)
            dx = dA = dB = dm = None
            if need_x:
                if drop is None:
                    dx = torch.mm(gz, weight.to(dtype)).addmm_(gu, a)
                else:  # the dropped LoRA term first, then the base term accumulated onto it in the matmul
                    dx = _zeroed(torch.mm(gu, a), drop, inplace=True).addmm_(gz, weight.to(dtype))
                dx = dx.view(*d_out.shape[:-1], dx.shape[-1]).to(ctx.x_dtype)
            if need_a:
                dA = torch.mm(gu.t(), _zeroed(x2, drop)).to(a_dtype)
                if q != 1.0:
                    dA.mul_(q)
            if need_b:
                dB = torch.mm(gz.t(), u).to(b_dtype).mul_(s)
            if need_m and out is not None:
                o = out.reshape(-1, out_features)
                if bias is not None:
                    o = o - bias.to(dtype)
                # summed in the activation dtype (accumulated in float32 inside the reduction), no float32 copy
                dm = torch.mul(dz, o).sum(dim=0).to(magnitude.dtype).div_(magnitude.detach())
        return dx, None, None, dA, dB, dm, None, None, None, None


# ------------------------------------------------------------------------------------------ installing


def _single_adapter(module: LoraLinear) -> str | None:
    names = [a for a in module.active_adapters if a in module.lora_A]
    return names[0] if len(names) == 1 else None


def _compute_dtype(module: LoraLinear, x: torch.Tensor, adapter: str) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    weight = module.get_base_layer().weight
    # Without autocast, fuse only when everything already has one dtype (PEFT would otherwise cast).
    same = x.dtype == weight.dtype == module.lora_A[adapter].weight.dtype
    return x.dtype if same else None


def _fusable(
    module: LoraLinear, x: torch.Tensor, args: tuple, kwargs: dict
) -> tuple[str, torch.dtype] | None:
    if args or kwargs or not (module.training and torch.is_grad_enabled()):
        return None
    if module.disable_adapters or module.merged:
        return None
    adapter = _single_adapter(module)
    if adapter is None:
        return None
    base = module.get_base_layer()
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if not _is_plain_float_weight(weight) or weight.requires_grad:
        return None
    if bias is not None and bias.requires_grad:
        return None
    if getattr(module.lora_B[adapter], "bias", None) is not None:
        return None
    dropout = module.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)) or getattr(dropout, "p", 0.0) >= 1.0:
        return None
    variant = module.lora_variant.get(adapter)
    if variant is not None:
        if not isinstance(variant, FastDoraLinearVariant):
            return None
        if bool((module.lora_magnitude_vector[adapter].weight == 0).any()):
            return None
    dtype = _compute_dtype(module, x, adapter)
    return None if dtype is None else (adapter, dtype)


def _forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plan = _fusable(self, x, args, kwargs)
    if plan is None:
        return type(self).forward(self, x, *args, **kwargs)
    adapter, dtype = plan
    base = self.get_base_layer()
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    dora = adapter in self.lora_variant
    magnitude = self.lora_magnitude_vector[adapter].weight if dora else None
    norm = dora_weight_norm(self, adapter) if dora else None
    return FusedLoraLinear.apply(
        x,
        base.weight,
        base.bias,
        self.lora_A[adapter].weight,
        self.lora_B[adapter].weight,
        magnitude,
        norm,
        float(self.scaling[adapter]),
        float(p),
        dtype,
    )


def installed(module: nn.Module) -> bool:
    return (
        isinstance(module.__dict__.get("forward"), types.MethodType)
        and module.__dict__["forward"].__func__ is _forward
    )


def install(model: nn.Module) -> int:
    """Route every LoRA ``Linear`` layer of ``model`` through the fused forward when it applies. Returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def uninstall(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and installed(module):
            del module.forward
            count += 1
    return count
