"""A faster DoRA forward for PEFT's LoRA ``Linear`` layers; the adapter stays in plain PEFT format.

DoRA (https://huggingface.co/papers/2402.09353) rescales every output row of the adapted weight
``W' = W + s * B @ A`` (``W``: out x in, ``A``: r x in, ``B``: out x r, ``s``: the LoRA scaling) to a learned
magnitude ``m``::

    y = m / ||W'||_row * (W x + s * B A x) + bias

PEFT's ``DoraLinearVariant`` computes ``||W'||_row`` on every forward of every layer by materialising ``B @ A``
through an identity matmul (``lora_B(lora_A(eye(in)))``), adding it to ``W`` and taking the norm, i.e. several
out x in temporaries plus an in x in x r matmul. This module gets the same norms from r-sized quantities only,
using the expansion of the squared row norm (``w_i``, ``b_i`` are rows of ``W`` and ``B``)::

    ||w_i + s * b_i A||^2 = ||w_i||^2 + 2 s * sum_k B_ik (W A^T)_ik + s^2 * b_i (A A^T) b_i^T

``||w_i||^2`` depends only on the frozen base weight, so it is computed once per layer and cached, keyed on the
weight's storage pointer, version counter, shape, stride, dtype and device, and dropped whenever PEFT merges or
unmerges through this variant. The remaining terms need one ``W A^T`` (out x r) and one ``A A^T`` (r x r). Everything
is computed in float32 (float64 for float64 weights) with autocast disabled, the sum is clamped at 0 against
cancellation before the square root, and the norm is treated as a constant (no gradient), exactly as PEFT does
following section 4.3 of the paper.

The output reuses the base layer's result instead of a second ``W x``. With ``g = m / ||W'||_row`` and ``result =
W x + bias`` (what the base layer returned, including anything earlier adapters added, as in PEFT)::

    out = g * result + (1 - g) * bias + g * s * lora_B(lora_A(x))

which is PEFT's ``result + (g - 1) * (result - bias) + g * s * lora_B(lora_A(x))`` rearranged so that the
bias term is a vector, not an activation-sized tensor.

Dropout (``lora_dropout > 0``, training mode) -- the one place this deliberately differs from PEFT. PEFT
computes ``out = result + (g - 1) * (W @ drop(x)) + g * s * lora_B(lora_A(drop(x)))``: the magnitude term
uses the dropped-out input, which costs a second full-size base matmul forward and backward per layer. Here
dropout is applied to the LoRA branch input only, and the magnitude term uses the undropped base output::

    out = g * result + (1 - g) * bias + g * s * lora_B(lora_A(drop(x)))     (= g * (W x + s B A drop(x)) + bias)

The dropout mask and ``drop(x)`` are the same as PEFT's (same dropout module, called at the same point, so
the same RNG draw). Per layer, both outputs are linear in ``drop(x)`` and inverted dropout has
``E[drop(x)] = x``, so both are unbiased estimates of the eval-mode layer output; this one has less noise (the
frozen base path sees no dropout, exactly as in plain LoRA) and needs no second matmul. In the backward pass the
LoRA branch is PEFT's (``A`` and ``B`` get ``g * s * d_out`` through ``lora_B(lora_A(drop(x)))``), while the
magnitude gets ``sum(d_out * (W x + s B A drop(x))) / ||W'||`` per row instead of PEFT's
``sum(d_out * (W drop(x) + s B A drop(x))) / ||W'||``; ``d_out`` itself differs too, because the outputs do.
(With several active adapters PEFT's dropout path also drops the earlier adapters' outputs from the magnitude
term; here ``result`` keeps them, as in PEFT's no-dropout path.)

In eval mode, or with ``lora_dropout == 0``, the output and gradients equal PEFT's up to float rounding. Under
autocast PEFT forms ``B @ A`` in the low precision before taking the norm while this module keeps it in float32,
so the two differ by that rounding.

Only the forward changes: ``init``, ``merge_safe``, ``merge_unsafe`` and ``unmerge`` are PEFT's, parameter
names are untouched, so saved adapters load and merge with vanilla PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.other import transpose
from torch import nn

__all__ = ["FastDoraLinearVariant", "enable_fast_dora", "dora_weight_norm"]

# Plain attribute on the LoRA layer (not a buffer, so it never reaches a state_dict): (key, ||w_i||^2).
_CACHE_ATTR = "_fast_dora_base_sq_norm"
NORM_ROWS = 1024  # rows of the base weight cast to float32 at a time for its row norms


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    # At least float32; keep float64 when the model is float64.
    return torch.promote_types(weight.dtype, torch.float32)


def _invalidate(module: nn.Module) -> None:
    module.__dict__.pop(_CACHE_ATTR, None)


def _base_sq_row_norms(module: LoraLinear, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||w_i||^2`` of the base weight (rows of ``W`` in out x in layout), cached per layer."""
    # data_ptr catches `weight.data = ...` (how PEFT merges/unmerges), _version catches in-place writes
    # through the parameter (optimizer steps, load_state_dict); the rest catches .to()/.half().
    key = (
        weight.data_ptr(),
        weight._version,
        tuple(weight.shape),
        weight.stride(),
        weight.dtype,
        weight.device,
        dtype,
        module.fan_in_fan_out,
    )
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = transpose(weight, module.fan_in_fan_out)
    # in blocks of rows: a float32 copy of the whole weight would be its size again, for every layer a
    # sharded run gathers (its weights are new tensors at every gather, so the cache misses there)
    sq = torch.cat([block.to(dtype).square().sum(dim=1) for block in w.split(NORM_ROWS)])
    module.__dict__[_CACHE_ATTR] = (key, sq)
    return sq


def dora_weight_norm(module: LoraLinear, adapter_name: str) -> torch.Tensor:
    """Row norms of ``W + s * B @ A`` for one DoRA adapter of a LoRA ``Linear``, without forming the matrix.

    Returns a detached float32 (float64 for float64 weights) vector of length ``out_features``.
    """
    weight = module.get_base_layer().weight
    dtype = _compute_dtype(weight)
    scaling = module.scaling[adapter_name]
    with torch.no_grad(), torch.autocast(device_type=weight.device.type, enabled=False):
        base_sq = _base_sq_row_norms(module, weight, dtype)
        w = transpose(weight, module.fan_in_fan_out)
        a = module.lora_A[adapter_name].weight.to(device=w.device, dtype=dtype)
        b = module.lora_B[adapter_name].weight.to(device=w.device, dtype=dtype)
        # W A^T (out x r) in W's own precision: casting a bf16/fp16 W up would copy the whole weight on every
        # forward. The product accumulates in float32 inside the matmul and is rounded once, which is finer
        # than PEFT, whose low-precision path forms and norms W + s B A entirely in that precision.
        wa = (w @ a.to(w.dtype).T).to(dtype)  # (out, r)
        # row i of c = 2 s (W A^T)_i + s^2 (B A A^T)_i, so <b_i, c_i> = 2 s <w_i, (B A)_i> + s^2 ||(B A)_i||^2
        c = torch.addmm(wa, b, a @ a.T, beta=2.0 * scaling, alpha=scaling * scaling)
        sq = (b * c).sum(dim=1).add_(base_sq)
        return sq.clamp_min_(0.0).sqrt_()


class FastDoraLinearVariant(DoraLinearVariant):
    """PEFT's ``DoraLinearVariant`` with a cheaper forward; merging and init are PEFT's own code.

    See the module docstring for the norm identity and for how ``lora_dropout > 0`` differs from PEFT.
    """

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # The weight is about to be swapped; a new tensor may even reuse the old storage address.
        _invalidate(module)
        return DoraLinearVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        _invalidate(module)
        DoraLinearVariant.merge_unsafe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        _invalidate(module)
        return DoraLinearVariant.unmerge(module, active_adapter, orig_weight)

    @staticmethod
    def forward(
        module: LoraLinear,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        magnitude = module.lora_magnitude_vector[active_adapter].weight
        bias = module.get_base_layer().bias

        weight_norm = dora_weight_norm(module, active_adapter)
        # Gradient reaches the magnitude only; the norm is a constant (DoRA sec. 4.3, as in PEFT).
        mag_norm_scale = magnitude.to(weight_norm.dtype) / weight_norm

        # Same condition as PEFT, but the dropped input feeds the LoRA branch only (see module docstring).
        if module.training and not isinstance(dropout, nn.Identity):
            x = dropout(x)
        lora_result = lora_B(lora_A(x))

        if result.dtype in (torch.float16, torch.bfloat16) and bias is None:
            return _combine_low_precision(result, lora_result, mag_norm_scale, scaling)
        # result * g promotes to float32, so autocast's low-precision result is rescaled and summed in float32
        # (as in PEFT) and rounded once at the end. It is a fresh tensor, so the in-place ops below are safe for
        # autograd (mul saves its inputs, addcmul saves lora_result and the scale, not `out`).
        out = result * mag_norm_scale
        if bias is not None:
            out.add_((1.0 - mag_norm_scale) * bias)
        out.addcmul_(lora_result, mag_norm_scale * scaling)
        return out.to(result.dtype)


def _combine_low_precision(result, lora_result, mag_norm_scale, scaling):
    """``g * (result + s * lora_result)`` for a bf16/fp16 ``result``, without float32 activation temporaries.

    Written as ``result + result * (g - 1) + lora_result * (g * s)`` with the two per-row factors rounded to
    the activation dtype. ``g`` stays near 1 (it is exactly 1 at initialisation), so rounding ``g - 1`` costs
    an absolute error of about ``|g - 1| * 2**-8`` relative to ``result``, and rounding ``g * s`` about
    ``2**-8`` of the (small) LoRA term: both below the rounding of the output itself to bf16/fp16, which the
    float32 path also ends with. Two fused multiply-adds in the activation dtype replace a float32 multiply,
    a float32 multiply-add and a cast, each over a float32 activation-sized tensor.
    """
    dtype = result.dtype
    out = torch.addcmul(result, result, (mag_norm_scale - 1.0).to(dtype))
    return out.addcmul_(lora_result, (mag_norm_scale * scaling).to(dtype))


def _is_plain_float_weight(weight: Any) -> bool:
    # Quantized or sharded weights (bnb, torchao, DTensor, ...) have no usable data_ptr/row norms: leave them to PEFT.
    return (
        isinstance(weight, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and weight.is_floating_point()
        and weight.dim() == 2
    )


def _linear_dora_layers(model: nn.Module):
    for module in model.modules():
        if isinstance(module, LoraLinear):
            yield module


def enable_fast_dora(model: nn.Module) -> int:
    """Switch every DoRA adapter on a LoRA ``Linear`` layer of ``model`` to :class:`FastDoraLinearVariant`.

    Embedding and conv DoRA variants, and layers whose base weight is quantized or sharded, keep PEFT's variant.
    Idempotent: returns the number of LoRA ``Linear`` layers that use the fast variant after the call (layers
    already switched by an earlier call included), so calling it twice returns the same number.
    """
    count = 0
    for module in _linear_dora_layers(model):
        if not _is_plain_float_weight(getattr(module.get_base_layer(), "weight", None)):
            continue
        fast = False
        for name, variant in list(module.lora_variant.items()):
            if type(variant) is DoraLinearVariant and getattr(module.lora_B[name], "bias", None) is None:
                module.lora_variant[name] = FastDoraLinearVariant()
                variant = module.lora_variant[name]
            fast = fast or isinstance(variant, FastDoraLinearVariant)
        count += fast
    return count
