"""Build: everything a training run needs before its first step, in two stages with nothing written.

    load(cfg)        tokenizer -> examples (data/dataset.py) -> frozen base -> Settings (settings.py),
                     base fingerprint
    attach(...)      adapter -> CPU fast path -> objective -> [strategy shards it] -> [DPO/KTO reference]
                     -> optimizer -> step plan -> scheduler

`loop.train` runs them around the one point where the run directory is created (between the two, since
PiSSA/OLoRA save their initial adapter into it), and `bench/paired_steps.py` runs them to build each side of
an A/B exactly as training does.

A sharded run (`train.sharding: fsdp`) builds its base on the meta device instead, and `attach` fills each
process's shards from the checkpoint once the strategy has split it (shard_loading.py): no process ever holds
the whole base.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_lora import meta, run_dir
from llama_lora.config import Config, TrainConfig
from llama_lora.data import templates
from llama_lora.data.batching import pad_id_for, plan_batches
from llama_lora.data.dataset import Dataset, load_dataset
from llama_lora.errors import ConfigError
from llama_lora.kernels import fused
from llama_lora.kernels.fastpath import FastPath
from llama_lora.model import adapters, hardware, loader
from llama_lora.progress import Bar
from llama_lora.train import rewards, settings, shard_loading
from llama_lora.train.objectives.base import Objective
from llama_lora.train.objectives.grpo_objective import Context, GRPOObjective
from llama_lora.train.objectives.kto import KTOObjective
from llama_lora.train.objectives.preference import PreferenceObjective, ReferencedObjective
from llama_lora.train.objectives.sft import ResponseObjective
from llama_lora.train.rollouts import Rollouts
from llama_lora.train.settings import Settings


def make_optimizer(params: list[torch.nn.Parameter], t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params``; ``t.optim`` auto takes torch's fused implementation where the device has one."""
    kwargs = {"lr": t.learning_rate, "weight_decay": t.weight_decay}
    if t.optim == "adamw_torch_fused" or (t.optim == "auto" and all(map(_fused_adamw_supported, params))):
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


try:  # torch checks this only at the first step; the check itself is private, so fall back to CPU/CUDA
    from torch.optim.optimizer import _device_dtype_check_for_fused
except ImportError:
    _device_dtype_check_for_fused = None


def _fused_adamw_supported(p: torch.Tensor) -> bool:
    if _device_dtype_check_for_fused is None:
        return p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
    try:
        _device_dtype_check_for_fused(p)
    except RuntimeError:
        return False
    return True


def micro_batch_plan(
    ds: Dataset, cfg: Config, budget: int | None, processes: int = 1
) -> tuple[list[list[list[int]]], int]:
    """The run's optimizer steps in order, each a group of `processes` x grad_accum micro-batches (lists of
    example indices; see parallel.py), and how many micro-batches one epoch has."""
    tcfg = cfg.train
    lengths = [len(e) for e in ds.train]
    rows, reuse = tcfg.batch_size, 1
    if tcfg.objective == "grpo":  # whole groups of completions per micro-batch, each step's kept N steps
        rows, budget, reuse = tcfg.batch_size // tcfg.num_generations, None, tcfg.num_iterations

    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_batches(lengths, rows, budget, seed=tcfg.seed + epoch)

    per_epoch = len(epoch_plan(0))
    plan: list[list[int]] = []
    if tcfg.max_steps:
        wanted = math.ceil(tcfg.max_steps / reuse) * tcfg.grad_accum * processes
        epoch = 0
        while len(plan) < wanted:
            plan.extend(epoch_plan(epoch))
            epoch += 1
        plan = plan[:wanted]
    else:
        for epoch in range(math.ceil(tcfg.epochs)):
            batches = epoch_plan(epoch)
            fraction = min(1.0, tcfg.epochs - epoch)
            plan.extend(batches[: max(1, round(len(batches) * fraction))])
    per_step = tcfg.grad_accum * processes
    steps = [plan[i : i + per_step] for i in range(0, len(plan), per_step)]
    steps = [group for group in steps for _ in range(reuse)]
    return (steps[: tcfg.max_steps] if tcfg.max_steps else steps), per_epoch


def load_base(
    cfg: Config, precision: str, ref: loader.ModelRef, sharded: bool = False
) -> tuple[Any, shard_loading.Source | None]:
    """The frozen base: 4-bit for QLoRA (`model.load_in_4bit`), else in its storage dtype; and, for a sharded
    run, where its rows are. `sharded`: the base on the meta device where its checkpoint allows it (each
    process fills its shards after sharding), so that no process loads the whole of it."""
    if cfg.model.load_in_4bit:
        compute = torch.float16 if precision == "fp16" else torch.bfloat16
        # sharded (QLoRA + FSDP): the packed 4-bit weights stored as `compute` elements, which FSDP can split
        storage = compute if cfg.train.sharding == "fsdp" else None
        return loader.load_model_4bit(cfg.model, compute, ref, quant_storage=storage), None
    dtype = hardware.storage_dtype(cfg.model, precision)
    on_meta = shard_loading.prepare(cfg.model, ref, dtype) if sharded else None
    return on_meta or (loader.load_model(cfg.model, dtype, ref), None)


def start_adapter(cfg: Config) -> Path | None:
    """`model.adapter` as an adapter directory (a run directory holds it in adapter/), or None."""
    if cfg.model.adapter is None:
        return None
    found = run_dir.adapter_dir_of(cfg.model.adapter)
    if found is None:
        raise ConfigError(
            f"model.adapter: {cfg.model.adapter} is not a run directory or an adapter directory"
        )
    return found


@dataclass
class Loaded:
    """What `load` makes: the data and the frozen base, and the settings resolved for them."""

    cfg: Config
    tokenizer: Any
    ds: Dataset
    model: Any  # the frozen base (transformers); on the meta device where `shards` is set
    settings: Settings
    fingerprint: dict[str, Any]
    shards: shard_loading.Source | None = None  # a sharded run's checkpoint, read once the model is split


def load(
    cfg: Config,
    rows: tuple[list[dict], list[dict]] | None = None,
    seed: bool = True,
    device_precision: tuple[str, str] | None = None,
    sharded: bool = False,
) -> Loaded:
    """Tokenizer, examples and the frozen base, and the `Settings` resolved for them. Writes nothing.
    `seed`: seed torch first (every process alike, so every one draws the same initial adapter).
    `device_precision`: what `hardware.describe_device(cfg.train)` gave the caller, if it asked already.
    `sharded`: `attach` will be given a strategy that splits the model (FSDP2): the base stays on the meta
    device (`load_base`)."""
    from transformers import set_seed

    device, precision = device_precision or hardware.describe_device(cfg.train)
    start = start_adapter(cfg)
    if start is not None:  # the continued adapter's shape, so config.yaml and the summary say what runs
        cfg = cfg.model_copy(update={"peft": cfg.peft.model_copy(update=adapters.shape_of(start))})
    ref = loader.resolve(cfg.model.name)
    tokenizer = loader.load_tokenizer(cfg.model, ref)
    ds = load_dataset(cfg, tokenizer, rows)
    if seed:
        set_seed(cfg.train.seed)
    model, shards = load_base(cfg, precision, ref, sharded)
    adapters.check_targets(model, cfg.peft.target_modules)
    # a meta model has no values: the fingerprint's embedding values come from the checkpoint
    seen = model if shards is None else shard_loading.fingerprint_view(model, shards)
    stored = (meta.read_meta(start) or {}).get("base_fingerprint") if start is not None else None
    if stored is not None and not meta.fingerprint_matches(stored, seen):
        raise ConfigError(
            f"model.adapter: {cfg.model.adapter} was trained for a different base model than {cfg.model.name} "
            "(shapes or weights differ)"
        )
    return Loaded(
        cfg,
        tokenizer,
        ds,
        model,
        settings.resolve(cfg, model.config, device, precision),
        meta.base_fingerprint(seen),
        shards,
    )


@dataclass
class Setup:
    """What `attach` makes: the trainable model and everything that steps it."""

    loaded: Loaded
    peft_model: Any
    fast: FastPath
    objective: Objective
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: list[list[list[int]]]  # optimizer steps, each a group of micro-batches (example indices)
    per_epoch: int  # micro-batches in one epoch
    initial_dir: Path | None  # PiSSA/OLoRA: the initial adapter, needed again when saving
    notes: list[str]  # warnings about the plan, for the log


def attach(
    loaded: Loaded,
    processes: int = 1,
    initial_dir: Path | None = None,
    layers=fused,
    strategy=None,
    quiet: bool = True,
) -> Setup:
    """Adapter, fast path, objective, optimizer, step plan and schedule on `loaded`'s base. `layers`: the
    fused-projection module (bench/paired_steps.py swaps in another version of fused.py). `strategy`
    (strategy.py): how the launch's processes hold the model; FSDP2 shards it here, before DPO's reference pass
    and the optimizer. None: one process. `quiet`: no progress bar for the reference pass."""
    from transformers import get_scheduler

    cfg, s = loaded.cfg, loaded.settings
    start = start_adapter(cfg)
    if s.gradient_checkpointing:
        loader.enable_checkpointing(loaded.model)
    on_meta = (
        shard_loading.attaching(loaded.shards) if loaded.shards is not None else contextlib.nullcontext()
    )
    with on_meta:
        peft_model = adapters.attach(
            loaded.model,
            cfg.peft,
            s.device,
            initial_dir=initial_dir,
            autocast=s.autocast,
            start_from=start,
        )
    s.fast_path.install(peft_model, loaded.model, layers=layers)
    objective = make_objective(peft_model, loaded, fresh=start is None)
    if strategy is not None:
        strategy.shard_model(objective.module, peft_model, s.device)
    if loaded.shards is not None:
        shard_loading.materialise(objective.module, peft_model, loaded.shards, s.device, start)
    if cfg.train.objective in ("dpo", "orpo", "kto"):
        precompute_reference(objective, peft_model, loaded, start, quiet)
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    steps, per_epoch = micro_batch_plan(loaded.ds, cfg, s.batch_tokens, processes)
    scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * len(steps)),
        num_training_steps=len(steps),
    )
    return Setup(
        loaded,
        peft_model,
        s.fast_path,
        objective,
        params,
        optimizer,
        scheduler,
        steps,
        per_epoch,
        initial_dir,
        plan_notes(cfg, steps),
    )


def plan_notes(cfg: Config, steps: list[list[list[int]]]) -> list[str]:
    """KTO estimates its KL reference point per micro-batch: a warning when they hold few rows."""
    sizes = [len(b) for group in steps for b in group]
    mean = sum(sizes) / max(len(sizes), 1)
    if cfg.train.objective != "kto" or not sizes or mean >= 4:
        return []
    return [
        f"warning: KTO estimates its KL reference point per micro-batch, and these hold {mean:.1f} rows on "
        "average; raise train.max_batch_tokens (and train.batch_size) for a steadier estimate"
    ]


def make_objective(peft_model, loaded: Loaded, fresh: bool = True) -> Objective:
    """The `Objective` `train.objective` names, on the adapted model. `fresh`: no `model.adapter` to continue."""
    s, t = loaded.settings, loaded.cfg.train
    pad = pad_id_for(loaded.tokenizer)
    if t.objective == "grpo":
        return grpo_objective(
            peft_model, loaded, fresh and loaded.cfg.peft.init_lora_weights in (True, "gaussian")
        )
    if t.objective == "sft":
        return ResponseObjective(peft_model, collate=lambda rows: s.fast_path.collate(rows, pad), pad_id=pad)
    if t.objective == "kto":
        weights = (t.kto_desirable_weight, t.kto_undesirable_weight)
        return KTOObjective(peft_model, t.beta, *weights, pad, packed=s.fast_path.packing)
    return PreferenceObjective(
        peft_model, t.objective, t.beta, t.label_smoothing, pad, packed=s.fast_path.packing
    )


def grpo_objective(peft_model, loaded: Loaded, fresh: bool) -> GRPOObjective:
    """GRPO's objective: its rewards, its sampler (the engine, in bf16 on a CPU that trains in bf16) and where
    it runs. `fresh`: the adapter starts at B = 0 (the KL reference is then the base, the adapter off)."""
    from accelerate import PartialState

    s, cfg = loaded.settings, loaded.cfg
    device = next(p for p in peft_model.parameters()).device
    sampler = Rollouts(
        peft_model,
        loaded.tokenizer,
        templates.stop_token_ids(loaded.tokenizer, loaded.model),
        bf16=s.device == "cpu" and s.precision == "bf16",
        context=getattr(loaded.model.config, "max_position_embeddings", None),
    )
    state = PartialState()
    where = Context(
        device,
        (device.type, torch.float16 if s.precision == "fp16" else torch.bfloat16, s.autocast),
        Path(cfg.output.dir),
        state.is_main_process,
        state.process_index,
        state.num_processes,
    )
    specs = rewards.load_rewards(cfg.train.rewards, cfg.train.reward_weights)
    pad = pad_id_for(loaded.tokenizer)
    return GRPOObjective(
        peft_model, loaded, specs, sampler, lambda rows: s.fast_path.collate(rows, pad), where, fresh
    )


def precompute_reference(
    objective: ReferencedObjective,
    peft_model,
    loaded: Loaded,
    start: Path | None,
    quiet: bool = True,
) -> None:
    """The reference log-probabilities (DPO: of every pair; KTO: of every answer and KL sequence), before
    the first step, with a progress bar unless `quiet`. `start`: the adapter training continues
    (`start_adapter`), or None."""
    cfg, s = loaded.cfg, loaded.settings
    device = next(p for p in peft_model.parameters()).device
    dtype = torch.float16 if s.precision == "fp16" else torch.bfloat16
    # a fresh adapter with B = 0 adds nothing: the reference is the base alone, without the adapter's
    # work (an adapter that training starts from, or PiSSA/OLoRA's moved base, must stay in)
    fresh = start is None and cfg.peft.init_lora_weights in (True, "gaussian")
    adapter_off = peft_model.disable_adapter() if fresh else contextlib.nullcontext()
    total = len(loaded.ds.train) + len(loaded.ds.eval)
    bar = Bar("reference log-probs", total=total, unit="examples", lines=True, quiet=quiet or not total)
    with bar, adapter_off, torch.autocast(device.type, dtype=dtype, enabled=s.autocast):
        for examples in (loaded.ds.train, loaded.ds.eval):
            objective.precompute_reference(
                examples, cfg.train.batch_size, s.batch_tokens, device, done=bar.advance
            )
