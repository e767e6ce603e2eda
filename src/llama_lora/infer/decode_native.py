"""decode.py's one-sequence step compiled for this CPU (decode_step.cpp), built the first time it is needed.

Why: at one row a Python step spends about a third of its time dispatching some 40 small tensor operations
per layer (norms, rotation, cache writes, attention), each a few microseconds however little it computes;
the C++ step does them as plain loops and leaves only the matrix products to ATen (bench/RESULTS.md).

The build uses torch's C++ extension loader (a C++ compiler and ninja; about 30 s, once: it is cached under
torch's extension directory, keyed by this CPU's instruction-set flags, so a cache moved to another CPU is
not run there). Where it cannot be built (no compiler, another platform), or with
LLAMA_LORA_NATIVE_DECODE=0, `step_for` returns None and decode.py runs its Python step: the same
arithmetic, slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["step_for", "available"]

SOURCE = Path(__file__).with_name("decode_step.cpp")
_module: object = None  # the built extension; False once it is found not to build here


def _cpu_tag() -> str:
    """A short hash of what the compiled code depends on: the CPU's instruction-set flags, torch, the source."""
    flags = platform.processor()
    with contextlib.suppress(OSError):
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
            flags,
        )
    key = "|".join((flags, torch.__version__, SOURCE.read_text()))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _build(note) -> object:
    if os.environ.get("LLAMA_LORA_NATIVE_DECODE", "1") == "0":
        return False
    from torch.utils import cpp_extension

    name = f"llama_lora_decode_{_cpu_tag()}"
    try:
        built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
        if not built.exists():
            note("compiling the one-sequence bf16 decode step for this CPU (once, about 30 s)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native"], verbose=False
            )
    except Exception as exc:  # no compiler, no ninja, a platform without -march=native: the Python step
        note(f"the compiled decode step is not available here ({type(exc).__name__}); using the Python step")
        return False


def available(note=None) -> bool:
    """Whether the compiled step can run here (built now if it was not)."""
    global _module
    if _module is None:
        _module = _build(note or (lambda message: print(message, file=sys.stderr)))
    return _module is not False


def step_for(decoder) -> object | None:
    """The compiled step over `decoder`'s bf16 weights (decode.Bf16Decoder on the CPU), or None."""
    if decoder.head.weight.device.type != "cpu" or not available():
        return None
    step = _module.Step()
    empty = torch.empty(0)

    def bias(projection) -> torch.Tensor:
        return empty if projection.bias is None else projection.bias

    n1, e1, qkv, o, n2, e2, gate_up, down = zip(*decoder.layers)
    step.norm1, step.eps1, step.norm2, step.eps2 = (
        list(n1),
        [float(e) for e in e1],
        list(n2),
        [float(e) for e in e2],
    )
    step.qkv_w, step.qkv_b = [p.weight for p in qkv], [bias(p) for p in qkv]
    step.o_w, step.o_b = [p.weight for p in o], [bias(p) for p in o]
    step.gate_up_w, step.gate_up_b = [p.weight for p in gate_up], [bias(p) for p in gate_up]
    step.down_w, step.down_b = [p.weight for p in down], [bias(p) for p in down]
    step.final_norm, step.final_eps = decoder.norm[0], float(decoder.norm[1])
    step.head = decoder.head.weight
    step.heads, step.kv_heads, step.dim = decoder.heads, decoder.kv_heads, decoder.head_dim
    step.intermediate = decoder.intermediate
    return step
