"""Training: set-up, then one readable loop on accelerate.

load tokenizer -> data -> model -> (validate; only now create the run dir) -> attach adapter
[resume: restore adapter, optimizer, scheduler, RNG and counters from a checkpoint; skip the steps it covers]
loop: forward (response-token loss) -> backward -> clip -> step -> schedule -> log / eval / save

Under `torchrun` / `accelerate launch` every process runs this same function on its share of each step's
micro-batches (see parallel.py); only the main process writes the run directory and prints.
"""

from __future__ import annotations

import math
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llama_lora import (
    adapters,
    checkpoint,
    data,
    fused,
    fused_blocks,
    memory,
    meta,
    models,
    packing,
    parallel,
    run_dir,
    tracking,
)
from llama_lora.batching import collate, pad_id_for, plan_batches
from llama_lora.config import Config, TrainConfig
from llama_lora.errors import DataError, LlamaLoraError
from llama_lora.loss import ResponseLoss, eval_sums
from llama_lora.progress import Reporter


class TrainingError(LlamaLoraError):
    pass


@dataclass
class Dataset:
    train: list[data.Example]
    eval: list[data.Example]
    template: str
    train_rows: int
    eval_rows: int
    notes: list[str]
    skipped_rows: int = 0  # rows without required fields, skipped with data.skip_bad_rows
    train_stats: data.PrepareStats | None = None  # what was cut or dropped (shown by `data inspect`)
    eval_stats: data.PrepareStats | None = None


def load_dataset(cfg: Config, tokenizer, rows: tuple[list[dict], list[dict]] | None = None) -> Dataset:
    """Tokenized training and held-out examples; `rows` = what split_rows(cfg) returns, when already loaded."""
    template = data.choose_template(tokenizer, cfg.data.template)
    train_rows, eval_rows = rows if rows is not None else data.split_rows(cfg.data, cfg.train.seed)
    if not train_rows:
        raise DataError(f"{cfg.data.source}: no rows in split {cfg.data.split!r}")
    train_ex, tstats = data.prepare(train_rows, tokenizer, cfg.data, template, where=cfg.data.source)
    eval_ex, estats = data.prepare(
        eval_rows, tokenizer, cfg.data, template, where=f"{cfg.data.source} (eval)"
    )
    if not train_ex:
        raise DataError(
            f"{cfg.data.source}: no training rows left after filtering ({tstats.summary()}); "
            "every label would be masked, so nothing could be learned. Raise data.max_length?"
        )
    notes = [f"train data: {tstats.summary()}"]
    if eval_rows:
        notes.append(f"eval data: {estats.summary()}")
    notes += data.placeholder_warnings(train_rows + eval_rows, cfg.data.fill, cfg.data.source)
    skipped = len(tstats.bad_rows) + len(estats.bad_rows)
    return Dataset(
        train_ex, eval_ex, template, len(train_rows), len(eval_rows), notes, skipped, tstats, estats
    )


AUTO_BATCH_TOKENS = {"cuda": 8192, "mps": 1024, "cpu": 1024}


def batch_tokens(cfg: Config, device: str) -> int | None:
    """The micro-batch token budget; `auto` picks one per device (see docs/memory.md)."""
    budget = cfg.train.max_batch_tokens
    return AUTO_BATCH_TOKENS.get(device, 1024) if budget == "auto" else budget


def use_fused(setting: bool | str, device: str) -> bool:
    """`train.fused`: `auto` turns the fused training layers on where they were measured (the CPU)."""
    return device == "cpu" if setting == "auto" else bool(setting)


def install_fused(peft_model, model, device: str, layers=fused) -> None:
    """`train.fused`: fused projections (``layers``, the fused module; bench/paired_steps.py swaps in another
    version), fused RMSNorm/SwiGLU, and packed-batch attention on the base ``model``."""
    layers.install(peft_model)
    fused_blocks.install(peft_model)
    if device == "cpu":
        fused_blocks.use_grouped_kv_attention()
    packing.enable(model)  # training micro-batches are packed (collate_packed); other calls take SDPA


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
    ds: Dataset, cfg: Config, device: str = "cpu", processes: int = 1
) -> tuple[list[list[int]], int]:
    """All micro-batches of the run in order, and how many one epoch has. An optimizer step takes
    `processes` x grad_accum of them (see parallel.py)."""
    tcfg = cfg.train
    lengths = [len(e) for e in ds.train]
    budget = batch_tokens(cfg, device)

    def epoch_plan(epoch: int) -> list[list[int]]:
        return plan_batches(lengths, tcfg.batch_size, budget, seed=tcfg.seed + epoch)

    per_epoch = len(epoch_plan(0))
    plan: list[list[int]] = []
    if tcfg.max_steps:
        wanted = tcfg.max_steps * tcfg.grad_accum * processes
        epoch = 0
        while len(plan) < wanted:
            plan.extend(epoch_plan(epoch))
            epoch += 1
        return plan[:wanted], per_epoch
    for epoch in range(math.ceil(tcfg.epochs)):
        batches = epoch_plan(epoch)
        fraction = min(1.0, tcfg.epochs - epoch)
        plan.extend(batches[: max(1, round(len(batches) * fraction))])
    return plan, per_epoch


def peak_memory_mb(device: str) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    out = {"peak_rss_mb": round(rss_mb, 1)}
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["peak_memory_mb"] = out.get("peak_cuda_mb", out["peak_rss_mb"])
    return out


def build_accelerator(device: str, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # each run in a process gets its own device/precision settings; safe under torchrun too, since
    # accelerate only creates the process group when none exists
    AcceleratorState._reset_state(True)
    return Accelerator(cpu=device == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision))


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: Any  # the PeftModel in memory after training
    tokenizer: Any
    run: Path
    main: bool = True  # False on the other processes of a data-parallel run (they wrote nothing)


def load_base(cfg: Config, precision: str, ref: models.ModelRef):
    """The frozen base: 4-bit for QLoRA (`model.load_in_4bit`), else in its storage dtype."""
    if cfg.model.load_in_4bit:
        compute = torch.float16 if precision == "fp16" else torch.bfloat16
        return models.load_model_4bit(cfg.model, compute, ref)
    return models.load_model(cfg.model, models.storage_dtype(cfg.model, precision), ref)


@dataclass
class Progress:
    """The loop's running totals; saved in each checkpoint so a resumed run's summary and metrics continue."""

    tokens_seen: int = 0
    train_time: float = 0.0
    micro_done: int = 0
    last_loss: float = float("nan")
    window_loss: float = 0.0  # sums since the last metrics record
    window_labels: int = 0
    window_tokens: int = 0
    window_time: float = 0.0
    processes: int = 1  # the data-parallel width: a checkpoint resumes only with the same one


class TrainingInterrupted(TrainingError):
    exit_code = 130


class SigintFlag:
    """While active, the first Ctrl-C only sets `requested` (the loop saves a checkpoint at the end of the
    step, then stops); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> SigintFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    cfg: Config, overwrite: bool = False, quiet: bool = False, log=print, resume: str | None = None
) -> TrainResult:
    """Train an adapter as `cfg` says. The summary is also written to train_summary.json.

    `resume` = "latest" (or a checkpoint name or path in output.dir) continues an interrupted run from its
    checkpoint; the result equals the uninterrupted run's."""
    from transformers import get_scheduler, set_seed

    tracking.check_installed(cfg.train.report_to)  # a missing tracker fails before any slow work
    device, precision = models.describe_device(cfg.train)
    models.check_load_in_4bit(cfg.model, device)
    adapters.lora_config(cfg.peft, device)  # validate adapter settings before any slow work
    accelerator = build_accelerator(device, precision)
    parallel.check_supported(accelerator)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = (lambda *a: None) if quiet or not main else log
    start_from = checkpoint.resume_point(Path(cfg.output.dir), resume, cfg.model_dump(mode="json"))
    ref = models.resolve(cfg.model.name)
    tokenizer = models.load_tokenizer(cfg.model, ref)
    ds = load_dataset(cfg, tokenizer)
    for note in ds.notes:
        say(note)

    set_seed(cfg.train.seed)  # the same on every process: the same initial adapter everywhere
    model = load_base(cfg, precision, ref)
    adapters.check_targets(model, cfg.peft.target_modules)
    fingerprint = meta.base_fingerprint(model)
    run = Path(cfg.output.dir)
    if start_from is None:
        run_dir.refuse_existing(run, overwrite)  # every process checks before the main one writes
    accelerator.wait_for_everyone()
    if main:
        if start_from is None:
            run = run_dir.prepare(run, overwrite)  # nothing is written before this point
        run_dir.write_text_atomic(run / "config.yaml", cfg.to_yaml())

    longest_batch = batch_tokens(cfg, device) or cfg.train.batch_size * cfg.data.max_length
    fused_on = use_fused(cfg.train.fused, device)
    ckpt = memory.choose_checkpointing(
        cfg.train.gradient_checkpointing, model.config, longest_batch, device, fused_on
    )
    say(f"gradient checkpointing {'on' if ckpt.enabled else 'off'} ({ckpt.reason})")
    if ckpt.enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    initial = None
    if adapters.converts_on_save(cfg.peft.init_lora_weights):  # other processes keep theirs out of the run
        initial = (
            run / ".init" if main else Path(tempfile.mkdtemp(prefix="llama-lora-init-"))
        ) / "adapter_init"
    peft_model = adapters.attach(model, cfg.peft, device, initial_dir=initial, autocast=precision != "fp32")
    if fused_on:
        install_fused(peft_model, model, device)
    n_train, n_total = adapters.trainable_parameters(peft_model)
    say(
        f"model {cfg.model.name}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable "
        f"({'DoRA' if cfg.peft.use_dora else 'LoRA'} r={cfg.peft.r}"
        f"{', 4-bit base' if cfg.model.load_in_4bit else ''}); device {device}, precision {precision}"
        + (f", {world} processes" if world > 1 else "")
        + (", fused training layers" if fused_on else "")
    )

    loss_fn = ResponseLoss(peft_model)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.train)
    plan, per_epoch = micro_batch_plan(ds, cfg, device, world)
    per_step = cfg.train.grad_accum * world
    steps = [plan[i : i + per_step] for i in range(0, len(plan), per_step)]
    scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * len(steps)),
        num_training_steps=len(steps),
    )
    # a 4-bit model already sits on its GPU and cannot be moved
    loss_fn, optimizer = accelerator.prepare(
        loss_fn, optimizer, device_placement=[not cfg.model.load_in_4bit, True]
    )
    eval_fn = accelerator.unwrap_model(loss_fn)  # evaluation needs no gradient sync between processes
    dev = accelerator.device
    pad = pad_id_for(tokenizer)
    labelled = [sum(1 for y in e.labels[1:] if y != data.IGNORE) for e in ds.train]
    eval_batches = [
        collate([ds.eval[i] for i in b], pad)
        for b in plan_batches(
            [len(e) for e in ds.eval], cfg.train.batch_size, batch_tokens(cfg, device), seed=0, shuffle=False
        )
    ]

    def run_eval() -> float | None:
        """Each process evaluates every world-th batch; the sums are added up (all processes call this)."""
        if not eval_batches:
            return None
        total, count = parallel.sum_across(accelerator, *eval_sums(eval_fn, eval_batches[rank::world], dev))
        return total / max(count, 1)

    def open_sinks() -> list:
        return tracking.open_sinks(cfg, run, main)

    def save_checkpoint(step: int) -> Path:
        other_rng = parallel.rng_states(accelerator)  # every process takes part
        if main:
            checkpoint.save(
                run, step, peft_model, optimizer, scheduler, asdict(progress), accelerator.scaler, other_rng
            )
            run_dir.prune_checkpoints(run, cfg.train.save_total_limit)
        accelerator.wait_for_everyone()
        return run / "checkpoints" / f"checkpoint-{step}"

    if start_from is None:
        first = 0
        progress = Progress(processes=world)
        metrics = run_dir.MetricsLog(run / "metrics.jsonl" if main else None, sinks=open_sinks())
        eval_before = run_eval()
        metrics.write({"step": 0, "epoch": 0.0, "eval_loss": eval_before})
        if eval_before is not None:
            say(f"eval loss before training: {eval_before:.4f}")
    else:  # continue exactly where the checkpoint left off: weights, optimizer, schedule, RNG, counters
        restored = checkpoint.load(
            start_from, peft_model, optimizer, scheduler, accelerator.scaler, rank, dev
        )
        first, progress = restored["step"], Progress(**restored["counters"])
        if progress.processes != world:
            raise TrainingError(
                f"--resume: {start_from} was saved by a run on {progress.processes} process(es); resume it "
                f"with the same number (this one has {world}), since the batches of each step depend on it"
            )
        if main:
            # checkpoints after the one resumed from are an abandoned future
            for later in run_dir.checkpoint_dirs(run):
                if run_dir.checkpoint_step(later) > first:
                    shutil.rmtree(later)
            metrics = run_dir.metrics_up_to(run / "metrics.jsonl", first, open_sinks())
        accelerator.wait_for_everyone()
        if not main:
            metrics = run_dir.MetricsLog(None, run_dir.records_up_to(run / "metrics.jsonl", first))
        eval_before = next((r.get("eval_loss") for r in metrics.records if r["step"] == 0), None)
        say(f"resuming from {start_from} (step {first} of {len(steps)})")

    loss_fn.train()
    reporter = Reporter(total=len(steps), quiet=quiet or not main)
    with reporter, SigintFlag() as interrupt:
        for step, group in enumerate(steps[first:], start=first + 1):
            t0 = time.perf_counter()
            n_labels = sum(labelled[i] for b in group for i in b)  # the whole group's, on every process
            step_tokens = sum(len(ds.train[i]) for b in group for i in b)  # non-padding tokens
            share = parallel.my_share(group, rank, world)
            step_loss = 0.0
            for slot, (b, weight) in enumerate(share):
                rows = [ds.train[i] for i in b]
                batch = packing.collate_packed(rows) if fused_on else collate(rows, pad)
                batch = {k: v.to(dev) for k, v in batch.items()}
                with parallel.sync_unless_last(accelerator, loss_fn, last=slot == len(share) - 1):
                    loss_sum, _ = loss_fn(**batch)
                    # DDP averages gradients over processes; x world makes it the group's sum / n_labels
                    accelerator.backward(loss_sum * (weight * world) / n_labels)
                step_loss += weight * float(loss_sum.detach())
            step_loss, stop = parallel.sum_across(accelerator, step_loss, float(interrupt.requested))
            if not math.isfinite(step_loss):
                good = [p for p in run_dir.checkpoint_dirs(run) if checkpoint.is_complete(p)]
                kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
                raise TrainingError(
                    f"training loss became {step_loss} at step {step}; stopped ({kept}). "
                    "Lower train.learning_rate or check the data."
                )
            if cfg.train.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            progress.train_time += dt
            progress.window_time += dt
            progress.window_loss += step_loss
            progress.window_labels += n_labels
            progress.window_tokens += step_tokens
            progress.micro_done += len(group)
            epoch = progress.micro_done / per_epoch
            progress.last_loss = step_loss / n_labels
            progress.tokens_seen += step_tokens
            reporter.update(step, progress.last_loss, progress.tokens_seen / progress.train_time)

            if step % cfg.train.logging_steps == 0 or step == len(steps):
                metrics.write(
                    {
                        "step": step,
                        "epoch": round(epoch, 4),
                        "loss": progress.window_loss / progress.window_labels,
                        "learning_rate": scheduler.get_last_lr()[0],
                        "tokens_per_second": progress.window_tokens / progress.window_time,
                    }
                )
                progress.window_loss, progress.window_labels = 0.0, 0
                progress.window_tokens, progress.window_time = 0, 0.0
            if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and step != len(steps):
                eval_loss = run_eval()
                metrics.write({"step": step, "epoch": round(epoch, 4), "eval_loss": eval_loss})
                if eval_loss is not None:  # None: no eval rows
                    reporter.note(f"step {step}: eval loss {eval_loss:.4f}")
            saved = None
            if cfg.train.save_steps and step % cfg.train.save_steps == 0 and step != len(steps):
                saved = save_checkpoint(step)
            if stop and step != len(steps):  # any process's Ctrl-C stops all of them at the same step
                saved = saved or save_checkpoint(step)
                raise TrainingInterrupted(
                    f"interrupted at step {step} of {len(steps)}; saved {saved}. "
                    "Continue with the same command plus --resume"
                )

    eval_after = run_eval()
    epochs = round(progress.micro_done / per_epoch, 4)
    metrics.write({"step": len(steps), "epoch": epochs, "eval_loss": eval_after})
    metrics.close()
    if main:
        with run_dir.atomic_dir(run / "adapter") as tmp:
            adapters.save_adapter(peft_model, tmp, tokenizer, initial_dir=initial)
            meta.write_meta(tmp, cfg.model_dump(mode="json"), ds.template, fingerprint)
    accelerator.wait_for_everyone()
    if initial is not None:
        shutil.rmtree(initial.parent, ignore_errors=True)

    train_losses = [r["loss"] for r in metrics.records if r.get("loss") is not None]
    summary = {
        "model": cfg.model.name,
        "method": "dora" if cfg.peft.use_dora else "lora",
        "dataset": cfg.data.source,
        "template": ds.template,
        "train_rows": ds.train_rows,
        "train_examples": len(ds.train),
        "eval_rows": ds.eval_rows,
        "eval_examples": len(ds.eval),
        "skipped_bad_rows": ds.skipped_rows,
        "steps": len(steps),
        "epochs": epochs,
        "train_loss": train_losses[-1] if train_losses else progress.last_loss,
        "eval_loss": eval_after,
        "eval_loss_before": eval_before,
        "runtime_s": round(progress.train_time, 2),
        "train_tokens": progress.tokens_seen,  # all processes together, as is tokens_per_second
        "tokens_per_second": round(progress.tokens_seen / progress.train_time, 2)
        if progress.train_time
        else None,
        "processes": world,
        "device": device,
        "precision": precision,
        "load_in_4bit": cfg.model.load_in_4bit,
        "trainable_parameters": n_train,
        "gradient_checkpointing": ckpt.enabled,
        "fused": fused_on,
        "torch": torch.__version__,  # the CUDA build costs ~0.37 GB more RSS on a CPU (docs/memory.md)
        **peak_memory_mb(device),  # of the main process
        "finished_at": run_dir.timestamp(),
    }
    if main:
        run_dir.write_json(run / "train_summary.json", summary)
        run_dir.plot_losses(
            metrics.records, run / "loss.png", title=f"{cfg.model.name} ({summary['method']})"
        )
    return TrainResult(summary, peft_model, tokenizer, run, main)
