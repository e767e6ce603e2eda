"""Sharded training builds its base without any process holding the whole of it (`train.sharding: fsdp`).

Loading the whole base on every process and sharding it afterwards makes every process hold a full copy (and
the loader's transients) while it loads: a base that does not fit one device could not be trained sharded at
all. Here no process ever holds the whole of it:

    prepare      the model on the meta device (shapes and dtypes as from_pretrained gives them, no storage),
                 its non-persistent buffers (the rotary frequencies) real, computed at init as ever
    [build.attach: PEFT attaches the adapter to the meta model, FSDP2 shards it (strategy.py)]
    materialise  each process allocates its own shards only (`to_empty`) and fills them: the base's rows
                 read from the checkpoint's safetensors files (only its rows), the adapter's initial values
                 exactly as the unsharded path has them, DoRA's magnitude from the process's own weight rows

FSDP2 splits dim 0 of every parameter torch.chunk-style (ceil(rows / W) rows each, the last pieces shorter or
empty): a process holds rows rank x ceil(rows / W) onwards, as many as its local tensor has. DoRA's magnitude
has one value per output row, so its shard covers the same rows as its weight's, and each process computes its
own values from its own rows.

The adapter must start where the unsharded path starts (the equality of sharded and unsharded runs rests on
it). PEFT creates lora_A and lora_B on the CPU even for a meta base, draws their initial values from the seeded
generator, and only then moves them to the base's device, where meta drops the values. `materialise` replays
those draws from the generator state PEFT started from, and checks that the generator ends where PEFT left it
(so dropout's later draws match too).

QLoRA (`model.load_in_4bit`, bitsandbytes quantizes as it loads) and bases stored only as pickles keep the
whole load (build.load).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from llama_lora import hub
from llama_lora.errors import ConfigError, ModelError
from llama_lora.kernels.head import first_row, shard_rows
from llama_lora.model import loader

# A read brings at most this many bytes of one tensor's rows in at a time (besides the shard it fills)
READ_BYTES = 64 * 2**20
# meta.py's fingerprint (its sample and the legacy hash) reads within the first 16 x 16 embedding values
CORNER = 16


@dataclass
class Source:
    """Where `materialise` reads a process's rows from."""

    files: dict[str, Path]  # tensor name in the checkpoint -> the safetensors file holding it
    dtype: torch.dtype  # the base's storage dtype
    # the base's modules under their checkpoint names, taken before PEFT wraps any of them
    modules: list[tuple[str, nn.Module]]
    rng: torch.Tensor | None = None  # the CPU generator's state before PEFT's draws (`attaching` sets it)


def prepare(mcfg, ref: loader.ModelRef, dtype: torch.dtype) -> tuple[nn.Module, Source] | None:
    """The base on the meta device and where its rows are; None where it has no safetensors files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = weights_dir(mcfg, ref)
    if directory is None:
        return None
    remote = {"trust_remote_code": mcfg.trust_remote_code}
    config = AutoConfig.from_pretrained(str(directory), **remote)
    with init_empty_weights(include_buffers=False):  # buffers real: init computes the rotary frequencies
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **remote)
    model.tie_weights()  # init_empty_weights re-registered every parameter, which undid the tie
    model.eval()  # as from_pretrained returns it
    model.config.use_cache = False  # as loader.load_model sets it
    model.config._name_or_path = ref.path if ref.kind == "hub" else str(directory)  # PEFT records it
    return model, Source(checkpoint_files(directory), dtype, list(model.named_modules()))


def weights_dir(mcfg, ref: loader.ModelRef) -> Path | None:
    """The local directory of the base's safetensors files (a GGUF converted, a hub id downloaded first), or
    None where it has none (pickled weights: only from_pretrained reads those)."""
    directory = hub_snapshot(mcfg, ref) if ref.kind == "hub" else Path(loader.local_path(ref))
    return directory if any(directory.glob("*.safetensors")) else None


def hub_snapshot(mcfg, ref: loader.ModelRef) -> Path:
    """The hub model's config and safetensors files in the hub cache, downloaded where they are not."""
    from huggingface_hub import snapshot_download

    kwargs = {"revision": mcfg.revision, "allow_patterns": ["*.json", "*.safetensors"]}
    # the tokenizer's download leaves a snapshot with the config but maybe no weights: such a one is not used
    found = hub.cache_first(
        lambda **cached: snapshot_download(ref.path, **cached, **kwargs), ref.path, "model", usable=_complete
    )
    return Path(found)


def _complete(directory: str | Path) -> bool:
    """Whether a snapshot holds every safetensors file of its checkpoint."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        named = set(json.loads(index.read_text())["weight_map"].values())
        return all((directory / name).is_file() for name in named)
    return any(directory.glob("*.safetensors"))


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: a sharded checkpoint's index, else every file's names."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def fingerprint_view(model: nn.Module, source: Source) -> Any:
    """`model` as meta.base_fingerprint reads it: its config and the input embedding's first values, here
    read from the checkpoint in the dtype the loaded model would hold them in."""
    key = _key(source, _names(source)[id(model.get_input_embeddings().weight)])
    corner = read_rows(source.files[key], key, 0, CORNER)[:, :CORNER].to(source.dtype)
    holder = SimpleNamespace(weight=corner)
    return SimpleNamespace(config=model.config, get_input_embeddings=lambda: holder)


@contextlib.contextmanager
def attaching(source: Source) -> Iterator[None]:
    """Around PEFT attaching the adapter to the meta base: keeps the generator state its draws start from
    (`materialise` replays them), and silences torch's warning, one per tensor, that loading a continued
    adapter (`model.adapter`) into meta parameters does nothing (`materialise` loads it)."""
    source.rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*copying from a non-meta parameter", UserWarning)
        yield


def materialise(
    root: nn.Module, peft_model: nn.Module, source: Source, device: str, start_from: Path | None = None
) -> None:
    """Allocate this process's shards of `root` (the FSDP2 root, sharded on the meta device) and fill them:
    the base from the checkpoint, the adapter as the unsharded path starts it, then `start_from`'s trained
    adapter over it where one is continued (`model.adapter`)."""
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    buffers = {name: b.clone() for name, b in root.named_buffers()}  # real already: to_empty would drop them
    root.to_empty(device=target)
    with torch.no_grad():
        for name, b in root.named_buffers():
            b.copy_(buffers[name])
        done = _fill_base(root, source) | _fill_adapter(peft_model, source)
    missing = [name for name, p in root.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"no values for {', '.join(missing[:3])} on this process; train it unsharded")
    if start_from is not None:
        from safetensors.torch import load_file

        from llama_lora.train import sharding

        sharding.load_adapter_state(peft_model, load_file(str(start_from / "adapter_model.safetensors")))


def _fill_base(root: nn.Module, source: Source) -> set[int]:
    """Every base parameter's rows on this process, from the checkpoint. Returns the ids of those filled."""
    names, done = _names(source), set()
    for param in root.parameters():
        if id(param) not in names:
            continue  # the adapter's
        key = _key(source, names[id(param)])
        local, start = local_rows(param)
        step = max(1, READ_BYTES // max(1, local[:1].numel() * local.element_size()))
        for first in range(0, local.shape[0], step):
            rows = read_rows(source.files[key], key, start + first, start + min(first + step, local.shape[0]))
            local[first : first + rows.shape[0]].copy_(rows.to(source.dtype))
        done.add(id(param))
    return done


def _fill_adapter(peft_model: nn.Module, source: Source) -> set[int]:
    """The adapter's initial values on this process: PEFT's draws replayed (`initial_pair`) and cast through
    the base's dtype, as PEFT's move to the base layer casts them; DoRA's magnitude is PEFT's row norm of
    W + s * B @ A over this process's rows of W. Returns the ids of the parameters filled."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    after, done = torch.get_rng_state(), set()
    torch.set_rng_state(source.rng)
    for layer in (m for m in peft_model.modules() if isinstance(m, LoraLinear)):
        weight = layer.get_base_layer().weight
        for name in layer.lora_A:
            a, b = initial_pair(layer, name, peft_model.peft_config[name].init_lora_weights)
            a, b = a.to(weight.dtype), b.to(weight.dtype)
            for param, full in ((layer.lora_A[name].weight, a), (layer.lora_B[name].weight, b)):
                local, start = local_rows(param)
                local.copy_(full[start : start + local.shape[0]])
                done.add(id(param))
            if name in layer.lora_magnitude_vector:
                rows, start = local_rows(weight)
                magnitude = layer.lora_magnitude_vector[name].weight
                local, first = local_rows(magnitude)
                if (first, local.shape[0]) != (start, rows.shape[0]):
                    raise RuntimeError("DoRA's magnitude is not sharded as its weight's rows are")
                # on the CPU, where PEFT computes it in the unsharded path (the base moves to its device later)
                norm = DoraLinearLayer(layer.fan_in_fan_out).get_weight_norm(
                    rows.cpu(), b[start : start + rows.shape[0]] @ a, layer.scaling[name]
                )
                local.copy_(norm)
                done.add(id(magnitude))
    if not torch.equal(torch.get_rng_state(), after):  # a PEFT that draws otherwise than initial_pair
        raise RuntimeError("the sharded adapter's initial draws do not replay PEFT's; train it unsharded")
    return done


def initial_pair(layer: nn.Module, name: str, init: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A and lora_B of one layer as PEFT's `LoraLayer.update_layer` draws them, in its order: an
    nn.Linear for A and one for B (each drawing its default init), then `reset_lora_parameters` (A redrawn,
    B zeroed). On the CPU, from the current generator state, as PEFT draws them."""
    if init not in (True, False, "gaussian"):
        raise ConfigError(f"peft.init_lora_weights: {init} cannot be initialised sharded; train it unsharded")
    r = layer.r[name]
    a = nn.Linear(layer.in_features, r, bias=False)
    b = nn.Linear(r, layer.out_features, bias=layer.lora_bias[name])
    if init is True:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    if init is not False:
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)
    return a.weight.detach(), b.weight.detach()


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This process's part of `param` (FSDP2's dim-0 shard) and the first row of the whole it holds."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"expected an FSDP2 parameter sharded on dim 0, got {type(param).__name__}")
    local, start = shard_rows(param)
    expected = (
        first_row(param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank() + 1) - start
    )
    if local.shape[0] != expected:
        raise RuntimeError(f"a shard of {local.shape[0]} rows where torch.chunk gives {expected}")
    return local, start


def read_rows(path: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (dim 0) of tensor `key` in its file; the file is mapped only while they are read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(key)[start:stop]


def _key(source: Source, names: list[str]) -> str:
    """The first of a parameter's names that the checkpoint holds (a tied one is stored under one name)."""
    key = next((name for name in names if name in source.files), None)
    if key is None:
        raise ModelError(f"the model's checkpoint has no tensor {names[0]}; train it unsharded")
    return key


def _names(source: Source) -> dict[int, list[str]]:
    """Each base parameter (by id) with its checkpoint names, in module order (a tied one has several)."""
    names: dict[int, list[str]] = {}
    for prefix, module in source.modules:
        for name, param in module.named_parameters(recurse=False):
            names.setdefault(id(param), []).append(f"{prefix}.{name}" if prefix else name)
    return names
