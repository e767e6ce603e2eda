"""Fused RMSNorm and SwiGLU for training Llama-family models with a frozen base: less kept for backward.

transformers' ``LlamaRMSNorm`` upcasts its input to float32 and autograd keeps that float32 copy (twice the
size of the bf16 input) for backward; its ``LlamaMLP`` keeps ``silu(gate)`` next to ``gate`` and ``up``. With
LoRA the norm weights are frozen, so the backward needs only the input gradient, and both operations can
recompute the cheap parts instead of keeping them:

- :class:`RMSNormFn` keeps the bf16/fp16 input and one float32 ``1/rms`` per token (instead of the float32
  input), and computes ``dx = r * (dh - xh * mean(dh * xh))`` with ``xh = x * r``, ``dh = (dy * w)`` in float32.
  The forward is transformers' exact sequence of operations, so outputs are bit-identical.
- :class:`SwiGLUFn` (``silu(gate) * up``) keeps ``gate`` and ``up`` only (tensors the fused DoRA layers keep
  anyway) and recomputes ``silu(gate)`` in backward; ``d gate`` uses ``silu_backward``, the kernel autograd uses.

:func:`install` patches the ``forward`` of matching module instances in one model (not the classes); modules
that do not match exactly (a trainable norm weight, another activation, extra attributes such as
``mlp_bias``) keep transformers' forward. :func:`uninstall` restores it. Used only for training
(``train.fused``); the fused paths apply in training mode with gradients enabled.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RMSNormFn", "SwiGLUFn", "install", "uninstall"]


class RMSNormFn(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (float32 statistics) for a frozen ``weight``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 as in transformers; float64 stays
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dh = (dy * weight).to(rstd.dtype)  # transformers' rounding: the product in x's dtype, then float32
        xh = x * rstd  # promotes to float32 in one pass
        dot = (dh * xh).mean(-1, keepdim=True)
        dx = torch.addcmul(dh, xh, dot, value=-1.0).mul_(rstd)
        return dx.to(x.dtype), None, None


class SwiGLUFn(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(dh * up, gate)
        if ctx.needs_input_grad[1]:
            d_up = dh * F.silu(gate)
        return d_gate, d_up


def _active(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def _norm_forward(self, hidden_states):
    if _active(self) and not self.weight.requires_grad:
        return RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    if _active(self):
        return self.down_proj(SwiGLUFn.apply(self.gate_proj(x), self.up_proj(x)))
    return type(self).forward(self, x)


# Only transformers' Llama classes, whose forward this module reproduces (tests/test_fused.py compares them).
def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__ == "LlamaRMSNorm" and isinstance(
        getattr(module, "weight", None), torch.Tensor
    )


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "LlamaMLP"
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(module, "act_fn", None)).__name__ in {"SiLU", "SiLUActivation"}
    )


def install(model: nn.Module) -> dict[str, int]:
    """Patch the RMSNorm and SwiGLU MLP instances of ``model``. Returns how many of each."""
    counts = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rms_norm"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
    return counts


def uninstall(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        bound = module.__dict__.get("forward")
        if isinstance(bound, types.MethodType) and bound.__func__ in (_norm_forward, _mlp_forward):
            del module.forward
            count += 1
    return count
