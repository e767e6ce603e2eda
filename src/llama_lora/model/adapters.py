"""The only PEFT user: LoRA/DoRA configuration, attaching, saving and loading adapters.

PiSSA and OLoRA initialise the adapter from the base weights and change those base weights in memory.
An adapter saved as-is would only be correct on that modified base, so when one of them is used the saved
adapter is converted (PEFT's `path_initial_model_for_weight_conversion`) into a plain LoRA that applies
to the original, unmodified base model.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from llama_lora.errors import ConfigError


def linear_module_names(model: nn.Module) -> set[str]:
    """Short names of the Linear layers inside the transformer blocks (lm_head excluded)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) and not full.endswith("lm_head"):
            names.add(full.rsplit(".", 1)[-1])
    return names


def check_targets(model: nn.Module, targets: list[str] | str) -> None:
    if targets == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"peft.target_modules: the model has no module named {', '.join(missing)} "
            f"(it has: {', '.join(sorted(available))})"
        )


def converts_on_save(init: bool | str) -> bool:
    return isinstance(init, str) and (
        init == "olora" or re.fullmatch(r"pissa(_niter_\d+)?", init) is not None
    )


def lora_config(pcfg, device: str):
    from peft import LoraConfig, TaskType
    from peft.tuners.lora.config import LoraRuntimeConfig

    if pcfg.ephemeral_gpu_offload and device != "cuda":
        raise ConfigError("peft.ephemeral_gpu_offload: only works on a CUDA device (it offloads to the GPU)")
    if converts_on_save(pcfg.init_lora_weights) and pcfg.use_dora:
        raise ConfigError(
            f"peft.init_lora_weights: {pcfg.init_lora_weights} with use_dora cannot be saved as an adapter for "
            "the original base model (PEFT cannot convert it); use it with use_dora: false"
        )
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=pcfg.r,
        lora_alpha=pcfg.lora_alpha,
        lora_dropout=pcfg.lora_dropout,
        target_modules=pcfg.target_modules,
        use_dora=pcfg.use_dora,
        use_rslora=pcfg.use_rslora,
        init_lora_weights=pcfg.init_lora_weights,
        runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=pcfg.ephemeral_gpu_offload),
    )


def attach(
    model: nn.Module,
    pcfg,
    device: str,
    initial_dir: Path | None = None,
    autocast: bool = False,
    start_from: Path | None = None,
):
    """Wrap `model` with a fresh adapter, or with the trained one in `start_from` (trainable). For PiSSA/OLoRA, the initial adapter is saved to `initial_dir`
    (needed to convert the trained adapter on save). `autocast`: training will run under bf16/fp16 autocast."""
    from peft import PeftModel, get_peft_model

    check_targets(model, pcfg.target_modules)
    if start_from is not None:  # model.adapter: continue a trained adapter (its shape is in pcfg already)
        peft_model = PeftModel.from_pretrained(model, str(start_from), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora_config(pcfg, device))
    if autocast and _low_precision(model):
        keep_input_dtype(peft_model)
    if pcfg.use_dora and pcfg.fast_dora:
        from llama_lora.model.fast_dora import enable_fast_dora

        enable_fast_dora(peft_model)
    if converts_on_save(pcfg.init_lora_weights) and start_from is None:
        if initial_dir is None:
            raise ValueError("PiSSA/OLoRA need a directory for the initial adapter")
        # the conversion later needs the initial adapter saved with init_lora_weights=True semantics
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(initial_dir), safe_serialization=True)
        peft_model.peft_config["default"].init_lora_weights = pcfg.init_lora_weights
    return peft_model


def _low_precision(model: nn.Module) -> bool:
    weight = model.get_input_embeddings().weight
    return weight.dtype in (torch.bfloat16, torch.float16)


def keep_input_dtype(peft_model) -> None:
    """Feed the adapters the layer input as it is (bf16/fp16) instead of PEFT's default float32 copy.

    PEFT casts every adapted layer's input to the adapter's float32 dtype, which with a low-precision base
    makes a float32 copy of each activation (kept for backward, and cast back to bf16 by autocast for the
    matmul). Training always runs such a base under autocast, so the adapter matmuls take bf16 inputs directly;
    the adapter weights and their gradients stay float32.
    """
    from peft.tuners.lora.layer import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False


def save_adapter(
    peft_model, target: Path, tokenizer=None, initial_dir: Path | None = None, state_dict=None
) -> None:
    """Write PEFT format (adapter_config.json + adapter_model.safetensors) and the tokenizer into `target`.
    `state_dict`: the adapter's full tensors where the model holds only shards (sharding.adapter_state)."""
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    if initial_dir is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(initial_dir)
    peft_model.save_pretrained(str(target), safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(target))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default"):
    """`base_model` wrapped with the saved adapter in `adapter_dir`, frozen (for inference, merge, compare).
    Raises RuntimeError when the adapter's shapes do not fit the base."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name)
    _fast_dora(model)
    return model


def _fast_dora(peft_model) -> None:
    """Loaded DoRA adapters run on fast_dora's variant, as trained ones do: PEFT's own forms the whole
    W + s B A for every forward, which an unmerged adapter (serve, compare) pays at every token."""
    from llama_lora.model.fast_dora import enable_fast_dora

    enable_fast_dora(peft_model)


def add_adapter(peft_model, adapter_dir: str | Path, adapter_name: str) -> None:
    """One more saved adapter on a model from `load_adapter`, under `adapter_name` (PEFT's named adapters:
    one base, several adapters, `use_adapter` picks one). Raises RuntimeError when the shapes do not fit."""
    peft_model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    _fast_dora(peft_model)


@contextlib.contextmanager
def use_adapter(model, adapter_name: str | None):
    """Run the block with the named adapter active, or with none (`None`: the base model alone)."""
    if adapter_name is None:
        if hasattr(model, "disable_adapter"):  # a PeftModel; a plain model is the base already
            with model.disable_adapter():
                yield
        else:
            yield
        return
    model.set_adapter(adapter_name, inference_mode=True)  # frozen: requires_grad stays off
    yield


def shape_of(adapter_dir: Path) -> dict:
    """The `peft` keys a saved adapter fixes (rank, alpha, targets, DoRA), for a run that continues it."""
    import json

    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    targets = saved.get("target_modules")
    return {
        "r": saved["r"],
        "lora_alpha": saved["lora_alpha"],
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_dora": bool(saved.get("use_dora")),
        "use_rslora": bool(saved.get("use_rslora")),
        "init_lora_weights": True,
    }
