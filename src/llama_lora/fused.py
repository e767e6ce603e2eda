"""Fused training forward/backward for PEFT's LoRA and DoRA ``Linear`` layers: one autograd node per projection.

PEFT builds an adapted projection out of several autograd nodes (base linear, dropout, ``lora_A``, ``lora_B``,
the add or DoRA's rescaling), and each keeps its own inputs for backward: per projection the dropout mask and
the dropped-out input (both the size of the input, in the activation dtype), the base output and the LoRA
output (both the size of the output, for DoRA's magnitude gradient). ``q``, ``k`` and ``v`` read the same
input but each keeps its own copies. :class:`FusedLoraLinear` computes the same layer with the same arithmetic
and keeps only what its backward needs:

- the layer input itself (one tensor shared by every projection that reads it: ``q``/``k``/``v``,
  ``gate``/``up``);
- the dropout keep-mask as one byte per element (instead of a 2-byte mask plus the 2-byte dropped input),
  and the rank-``r`` ``A @ drop(x)``;
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

Dropout is applied to the LoRA branch input only, as in :mod:`llama_lora.fast_dora` (for plain LoRA that *is*
PEFT's formula; for DoRA see that module). The mask comes from :func:`keep_mask`: 15 random bits per element
compared with a threshold, drop probability ``round(p * 32768) / 32768`` (0.0499878 for 0.05) and the matching
``1 / P(keep)`` scale, so the layer stays unbiased. It draws from torch's default generator (seeded, saved and
restored with checkpoints like every other random number here), but not the same numbers as ``nn.Dropout``:
runs are reproducible, not bit-identical to PEFT's dropout. Masks are applied with a bitwise AND on the
element bits, which on this CPU is ~20x faster than multiplying by a mask (see bench/RESULTS.md).

With dropout 0 or in eval mode the outputs and gradients equal PEFT's (float32: 1e-5; tests/test_fused.py).
The layer falls back to PEFT's own forward whenever it cannot apply: not training, no gradient, merged or
disabled adapters, several active adapters, per-row ``adapter_names``, a trainable or quantized base weight,
a bias on ``lora_B``, PEFT's DoRA variant (``peft.fast_dora: false``), or a zero magnitude entry.
Parameters and saved adapters are untouched (plain PEFT format).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.nn import functional as F

from llama_lora.fast_dora import FastDoraLinearVariant, _is_plain_float_weight, dora_weight_norm

__all__ = ["FusedLoraLinear", "keep_mask", "drop_probability", "install", "uninstall", "installed"]

_LEVELS = 1 << 15  # dropout resolution: 15 random bits per element
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dropped_levels(p: float) -> int:
    """How many of the 2**15 uniform levels drop an element."""
    return round(p * _LEVELS)


def drop_probability(p: float) -> float:
    """The drop probability :func:`keep_mask` actually uses for ``p`` (a multiple of 2**-15)."""
    return _dropped_levels(p) / _LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """Keep-mask as int8: -1 (all bits set) to keep an element, 0 to drop it, with P(drop) = drop_probability(p).

    One int64 ``random_()`` draw from the default generator (63 random bits, the sign bit is 0) gives four
    16-bit words; the low 15 bits of each are a uniform integer in [0, 32768), and an element is dropped when
    it falls below ``round(p * 32768)``. Independent across elements. About 5x faster than ``bernoulli_`` on
    this CPU, and the int8 form is applied with one bitwise AND (:func:`_masked`) without a conversion pass.
    """
    n = 1
    for d in shape:
        n *= d
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    uniform15 = words.view(torch.int16)[:n] & (_LEVELS - 1)
    return (uniform15 >= _dropped_levels(p)).view(torch.int8).neg_().view(shape)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the elements where ``keep`` is 0 set to +0: a bitwise AND of the element bits with the
    sign-extended int8 mask (-1 keeps every bit). ``keep=None`` (no dropout): ``t`` itself."""
    if keep is None:
        return t
    int_dtype = _INT_OF_SIZE[t.element_size()]
    return (t.view(int_dtype) & keep).view(t.dtype)


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
            keep = keep_mask(x2.shape, p, x.device) if p > 0 else None
            keep_scale = 1.0 / (1.0 - drop_probability(p))
            a = (lora_a * keep_scale).to(dtype) if keep_scale != 1.0 else lora_a.to(dtype)
            b = lora_b.to(dtype)
            u = F.linear(_masked(x2, keep), a)
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
        ctx.save_for_backward(x2, keep, u, out if dora else None, weight, bias, a, b, magnitude, gm1)
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        x2, keep, u, out, weight, bias, a, b, magnitude, gm1 = ctx.saved_tensors
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
                dx = torch.mm(gz, weight.to(dtype))
                if keep is None:
                    dx.addmm_(gu, a)
                else:
                    dx.add_(_masked(torch.mm(gu, a), keep))
                dx = dx.view(*d_out.shape[:-1], dx.shape[-1]).to(ctx.x_dtype)
            if need_a:
                dA = torch.mm(gu.t(), _masked(x2, keep)).to(a_dtype)
                if q != 1.0:
                    dA.mul_(q)
            if need_b:
                dB = torch.mm(gz.t(), u).to(b_dtype).mul_(s)
            if need_m and out is not None:
                o = out.reshape(-1, out_features)
                if bias is not None:
                    o = o - bias.to(dtype)
                dm = torch.sum(dz * o, dim=0, dtype=torch.float32).div_(magnitude.detach().float())
                dm = dm.to(magnitude.dtype)
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
    if not isinstance(module.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
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
