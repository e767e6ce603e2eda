"""Training: build (build.py), then restore, step, loop and summary here, on accelerate.

    build.load -> validate, create the run dir -> build.attach -> [restore from a checkpoint]
    loop: one step (forward -> backward over the step's micro-batches -> clip -> optimizer -> schedule)
          -> log / eval / save
    summary -> adapter/, train_summary.json, loss.png

The loop takes an `Objective` (objectives/base.py): its module gives the summed loss and unit count of a batch,
and a step divides the sum by the units of the whole step, so the loop holds no `if` about what is trained. It
takes a `Strategy` (strategy.py) for how the processes hold the model, so it holds no `if` about the topology
either. Under `torchrun` / `accelerate launch` every process runs this same code on its share of each step's
micro-batches (see parallel.py); only the main process writes the run directory and prints.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llama_lora import meta, run_dir, run_status
from llama_lora.config import Config
from llama_lora.errors import LlamaLoraError
from llama_lora.model import adapters, hardware, loader
from llama_lora.progress import Reporter
from llama_lora.train import build, checkpoint, parallel, tracking
from llama_lora.train.state import Counters, SigintFlag
from llama_lora.train.strategy import Replicated, gather_peaks, make_accelerator, peak_memory_mb
from llama_lora.train.strategy import choose as choose_strategy


class TrainingError(LlamaLoraError):
    pass


class TrainingInterrupted(TrainingError):
    exit_code = 130


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: Any  # the PeftModel in memory after training (fast path uninstalled: plain PEFT)
    tokenizer: Any
    run: Path
    main: bool = True  # False on the other processes of a data-parallel run (they wrote nothing)


class Run:
    """One training run in progress: the built setup, the accelerator, the run directory and the metrics.
    `step` is one optimizer step; `loop` runs the steps; `evaluate`, `save_checkpoint` serve both."""

    def __init__(self, setup: build.Setup, strategy: Replicated, run: Path, quiet: bool, log):
        self.setup, self.cfg, self.ds = setup, setup.loaded.cfg, setup.loaded.ds
        self.strategy, self.accelerator, self.run = strategy, strategy.accelerator, run
        accelerator = strategy.accelerator
        self.main, self.rank = accelerator.is_main_process, accelerator.process_index
        self.world = accelerator.num_processes
        self.quiet, self.say = quiet, (lambda *a: None) if quiet or not self.main else log
        self.module, self.optimizer = strategy.prepare(
            setup.objective.module, setup.optimizer, self.cfg.model.load_in_4bit
        )
        self.eval_module = accelerator.unwrap_model(self.module)  # evaluation needs no gradient sync
        tcfg, budget = self.cfg.train, setup.loaded.settings.batch_tokens
        self.eval_batches = setup.objective.eval_batches(self.ds.eval, tcfg.batch_size, budget)
        self.counters = Counters(processes=self.world)
        self.metrics: run_dir.MetricsLog | None = None
        self.grad_norm: float | None = None  # the last step's, before clipping (none without max_grad_norm)

    def evaluate(self) -> float | None:
        """Each process evaluates every world-th batch; the sums are added up (all processes call this)."""
        if not self.eval_batches:
            return None
        mine = self.eval_batches[self.rank :: self.world]
        sums = self.strategy.eval_sums(self.eval_module, self.eval_batches, mine, self.setup.objective)
        total, count = parallel.sum_across(self.accelerator, *sums)
        return total / max(count, 1)

    def eval_extras(self) -> dict[str, float]:
        """What the objective measured during the last evaluation besides the loss (DPO: rewards), over
        all processes (all call this)."""
        return self.setup.objective.take_metrics("eval", self.sum_across)

    def sum_across(self, *values: float) -> list[float]:
        return parallel.sum_across(self.accelerator, *values)

    def gathered(self) -> tuple[dict, dict] | None:
        """A sharded run's full adapter and optimizer state (every process takes part); None otherwise."""
        return self.strategy.gather(self.setup.peft_model, self.optimizer)

    def save_checkpoint(self, step: int) -> Path:
        other_rng = parallel.rng_states(self.accelerator)  # every process takes part
        gathered = self.gathered()
        if self.main:
            s = self.setup
            state = (
                s.peft_model,
                self.optimizer,
                s.scheduler,
                asdict(self.counters),
                self.accelerator.scaler,
            )
            checkpoint.save(self.run, step, *state, other_rng, gathered)
            run_dir.prune_checkpoints(self.run, self.cfg.train.save_total_limit)
        self.accelerator.wait_for_everyone()
        return self.run / "checkpoints" / f"checkpoint-{step}"

    def start(self) -> float | None:
        """A new run: metrics.jsonl opened, the base model evaluated (step 0)."""
        self.metrics = run_dir.MetricsLog(
            self.run / "metrics.jsonl" if self.main else None,
            sinks=tracking.open_sinks(self.cfg, self.run, self.main),
        )
        before = self.evaluate()
        self.metrics.write({"step": 0, "epoch": 0.0, "eval_loss": before, **self.eval_extras()})
        if before is not None:
            self.say(f"eval loss before training: {before:.4f}")
        shown = held_out_line(self.metrics.records[-1])
        if shown:  # GRPO: the held-out reward and accuracy, answered by generation
            self.say(f"held out before training: {shown}")
        return before

    def restore(self, start_from: Path) -> tuple[int, float | None]:
        """Continue exactly where the checkpoint left off: weights, optimizer, schedule, RNG, counters.
        Returns the step it covers and the eval loss before training."""
        s, acc = self.setup, self.accelerator
        restored = checkpoint.load(
            start_from,
            s.peft_model,
            self.optimizer,
            s.scheduler,
            acc.scaler,
            self.rank,
            acc.device,
            sharded=self.strategy.sharded,
        )
        first, self.counters = restored["step"], Counters(**restored["counters"])
        if self.counters.processes != self.world:
            raise TrainingError(
                f"--resume: {start_from} was saved by a run on {self.counters.processes} process(es); resume "
                f"it with the same number (this one has {self.world}), since the batches of each step depend on it"
            )
        records = self.run / "metrics.jsonl"
        if self.main:
            for later in run_dir.checkpoint_dirs(self.run):  # checkpoints after this one: an abandoned future
                if run_dir.checkpoint_step(later) > first:
                    shutil.rmtree(later)
            self.metrics = run_dir.metrics_up_to(
                records, first, tracking.open_sinks(self.cfg, self.run, True)
            )
        acc.wait_for_everyone()
        if not self.main:
            self.metrics = run_dir.MetricsLog(None, run_dir.records_up_to(records, first))
        before = next((r.get("eval_loss") for r in self.metrics.records if r["step"] == 0), None)
        self.say(f"resuming from {start_from} (step {first} of {len(s.steps)})")
        return first, before

    def step(
        self, number: int, group: list[list[int]], interrupt: SigintFlag
    ) -> tuple[float, int, int, bool]:
        """Optimizer step `number` over `group`'s micro-batches (this process's share of them): the summed
        loss and units of the whole group, its non-padding tokens, and whether any process asked to stop."""
        s, acc, rows = self.setup, self.accelerator, self.ds.train
        share = [
            ([rows[i] for i in b], weight) for b, weight in parallel.my_share(group, self.rank, self.world)
        ]
        # the whole group's units and tokens, on every process (GRPO samples its completions here)
        units, tokens = s.objective.begin_step(
            number, [[rows[i] for i in b] for b in group], share, self.sum_across
        )
        loss = 0.0
        for slot, (examples, weight) in enumerate(share):
            batch = {k: v.to(acc.device) for k, v in s.objective.collate(examples).items()}
            s.objective.recording(weight > 0)  # a weightless re-run adds nothing to the metrics
            last = slot == len(share) - 1
            # gradients are averaged over processes; x world makes them the group's sum / units
            loss_sum = self.strategy.forward_backward(self.module, batch, weight * self.world / units, last)
            loss += weight * float(loss_sum.detach())
        s.objective.recording(True)
        loss, stop = parallel.sum_across(acc, loss, float(interrupt.requested))
        if not math.isfinite(loss):
            good = [p for p in run_dir.checkpoint_dirs(self.run) if checkpoint.is_complete(p)]
            kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
            raise TrainingError(
                f"training loss became {loss} at step {number}; stopped ({kept}). "
                "Lower train.learning_rate or check the data."
            )
        if self.cfg.train.max_grad_norm:
            self.grad_norm = self.strategy.clip(s.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        s.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, units, tokens, bool(stop)

    def loop(self, first: int) -> None:
        """Steps first+1 .. the last, logging, evaluating and saving as the config says."""
        tcfg, steps, c = self.cfg.train, self.setup.steps, self.counters
        last = len(steps)
        self.module.train()
        with Reporter(total=last, quiet=self.quiet or not self.main) as reporter, SigintFlag() as interrupt:
            for step, group in enumerate(steps[first:], start=first + 1):
                t0 = time.perf_counter()
                loss, units, tokens, stop = self.step(step, group, interrupt)
                c.add(loss, units, tokens, len(group), time.perf_counter() - t0)
                epoch = round(c.micro_done / self.setup.per_epoch, 4)
                reporter.update(
                    step, c.last_loss, c.tokens_seen / c.train_time, self.setup.objective.progress()
                )
                if step % tcfg.logging_steps == 0 or step == last:
                    lr = self.setup.scheduler.get_last_lr()[0]
                    window = c.take_window()
                    record = {"step": step, "epoch": epoch, "loss": window.pop("loss"), "learning_rate": lr}
                    if self.grad_norm is not None:
                        record["grad_norm"] = self.grad_norm
                    extras = self.setup.objective.take_metrics("train", self.sum_across)
                    self.metrics.write({**record, **window, **extras})
                if tcfg.eval_steps and step % tcfg.eval_steps == 0 and step != last:
                    eval_loss = self.evaluate()
                    self.metrics.write(
                        {"step": step, "epoch": epoch, "eval_loss": eval_loss, **self.eval_extras()}
                    )
                    if eval_loss is not None:  # None: no eval rows
                        reporter.note(f"step {step}: eval loss {eval_loss:.4f}")
                saved = None
                if tcfg.save_steps and step % tcfg.save_steps == 0 and step != last:
                    saved = self.save_checkpoint(step)
                if stop and step != last:  # any process's Ctrl-C stops all of them at the same step
                    saved = saved or self.save_checkpoint(step)
                    raise TrainingInterrupted(
                        f"interrupted at step {step} of {last}; saved {saved}. "
                        "Continue with the same command plus --resume"
                    )

    def finish(self, eval_before: float | None) -> dict[str, Any]:
        """Evaluate, save the adapter, write train_summary.json and loss.png; the fast path comes off."""
        s, loaded, c = self.setup, self.setup.loaded, self.counters
        eval_after = self.evaluate()
        epochs = round(c.micro_done / s.per_epoch, 4)
        self.metrics.write(
            {"step": len(s.steps), "epoch": epochs, "eval_loss": eval_after, **self.eval_extras()}
        )
        self.metrics.close()
        s.fast.uninstall(s.peft_model, loaded.model)  # what is saved and returned is plain PEFT
        full = self.gathered()
        self.strategy.release(self.module)
        self.peaks = gather_peaks(self.accelerator, self.setup.loaded.settings.device, s.peft_model)
        if self.main:
            with run_dir.atomic_dir(self.run / "adapter") as tmp:
                adapters.save_adapter(
                    s.peft_model,
                    tmp,
                    loaded.tokenizer,
                    initial_dir=s.initial_dir,
                    state_dict=full[0] if full else None,
                )
                meta.write_meta(tmp, self.cfg.model_dump(mode="json"), loaded.ds.template, loaded.fingerprint)
        self.accelerator.wait_for_everyone()
        if s.initial_dir is not None:
            shutil.rmtree(s.initial_dir.parent, ignore_errors=True)
        summary = self.summary(eval_before, eval_after, epochs)
        if self.main:
            run_dir.write_json(self.run / "train_summary.json", summary)
            title = f"{self.cfg.model.name} ({summary['method']})"
            run_dir.plot_losses(self.metrics.records, self.run / "loss.png", title=title)
        return summary

    def summary(self, eval_before: float | None, eval_after: float | None, epochs: float) -> dict[str, Any]:
        cfg, ds, c, st = self.cfg, self.ds, self.counters, self.setup.loaded.settings
        train_losses = [r["loss"] for r in self.metrics.records if r.get("loss") is not None]
        return {
            "model": cfg.model.name,
            "method": "dora" if cfg.peft.use_dora else "lora",
            "objective": cfg.train.objective,
            "dataset": cfg.data.source,
            "template": ds.template,
            "train_rows": ds.train_rows,
            "train_examples": len(ds.train),
            "eval_rows": ds.eval_rows,
            "eval_examples": len(ds.eval),
            "skipped_bad_rows": ds.skipped_rows,
            "steps": len(self.setup.steps),
            "epochs": epochs,
            "train_loss": train_losses[-1] if train_losses else c.last_loss,
            "eval_loss": eval_after,
            "eval_loss_before": eval_before,
            "held_out_before": held_out(next((r for r in self.metrics.records if r["step"] == 0), {})),
            "held_out": held_out(self.metrics.records[-1] if self.metrics.records else {}),
            "runtime_s": round(c.train_time, 2),
            "train_tokens": c.tokens_seen,  # all processes together, as is tokens_per_second
            "tokens_per_second": round(c.tokens_seen / c.train_time, 2) if c.train_time else None,
            "processes": self.world,
            "sharding": self.strategy.name,
            "device": st.device,
            "precision": st.precision,
            "load_in_4bit": cfg.model.load_in_4bit,
            "trainable_parameters": adapters.trainable_parameters(self.setup.peft_model)[0],
            "gradient_checkpointing": st.gradient_checkpointing,
            "fused": st.fast_path.fused,
            "settings": st.as_dict(),
            "torch": torch.__version__,  # the CUDA build costs more resident memory on a CPU (docs/memory.md)
            **peak_memory_mb(st.device),  # of the main process
            "peak_memory_per_process": getattr(self, "peaks", None),
            "finished_at": run_dir.timestamp(),
        }


def held_out(record: dict[str, Any]) -> dict[str, float]:
    """A GRPO evaluation's figures in a metrics record (`eval_reward`, `eval_accuracy/<reward>`); {} else."""
    return {k: v for k, v in record.items() if k == "eval_reward" or k.startswith("eval_accuracy/")}


def held_out_line(record: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in held_out(record).items())


def _model_line(setup: build.Setup, world: int) -> str:
    cfg = setup.loaded.cfg
    n_train, n_total = adapters.trainable_parameters(setup.peft_model)
    return (
        f"model {cfg.model.name}: {n_total / 1e6:.1f}M parameters, {n_train / 1e6:.2f}M trainable "
        f"({'DoRA' if cfg.peft.use_dora else 'LoRA'} r={cfg.peft.r}"
        f"{', 4-bit base' if cfg.model.load_in_4bit else ''})"
        + (f", {world} processes" if world > 1 else "")
        + (", sharded (FSDP2)" if world > 1 and cfg.train.sharding == "fsdp" else "")
    )


def train(
    cfg: Config, overwrite: bool = False, quiet: bool = False, log=print, resume: str | None = None
) -> TrainResult:
    """Train an adapter as `cfg` says. The summary is also written to train_summary.json.

    `resume` = "latest" (or a checkpoint name or path in output.dir) continues an interrupted run from its
    checkpoint; the result equals the uninterrupted run's."""
    tracking.check_installed(cfg.train.report_to)  # a missing tracker fails before any slow work
    device, precision = hardware.describe_device(cfg.train)
    loader.check_load_in_4bit(cfg.model, device)
    adapters.lora_config(cfg.peft, device)  # validate adapter settings before any slow work
    if cfg.train.sharding == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from llama_lora.train.sharding import settle_allocator

        settle_allocator(torch.device(device))  # before the process group's threads exist
    accelerator = make_accelerator(device, precision)
    main = accelerator.is_main_process
    say = (lambda *a: None) if quiet or not main else log
    cfg, strategy = choose_strategy(cfg, accelerator, device, say)
    start_from = checkpoint.resume_point(Path(cfg.output.dir), resume, cfg.model_dump(mode="json"))

    loaded = build.load(cfg, device_precision=(device, precision), sharded=strategy.sharded)
    cfg = loaded.cfg  # with model.adapter, the peft keys are the continued adapter's
    for note in loaded.ds.notes:
        say(note)
    run = Path(cfg.output.dir)
    if start_from is None:
        run_dir.refuse_existing(run, overwrite)  # every process checks before the main one writes
    accelerator.wait_for_everyone()
    if main:
        if start_from is None:
            run = run_dir.prepare(run, overwrite)  # nothing is written before this point
        run_dir.write_text_atomic(run / "config.yaml", cfg.to_yaml())
    resumed = {"resumed_from": str(start_from)} if start_from is not None else {}
    with run_status.recorded(run, main, **resumed) as status:  # status.json: running, then how it ended
        return _attach_and_run(loaded, strategy, run, start_from, quiet, log, status)


def _attach_and_run(loaded, strategy, run: Path, start_from, quiet: bool, log, status) -> TrainResult:
    """build.attach, then the steps from the start or from `start_from`, then the summary."""
    cfg, world = loaded.cfg, strategy.accelerator.num_processes
    main = strategy.accelerator.is_main_process
    say = (lambda *a: None) if quiet or not main else log
    initial = None
    if adapters.converts_on_save(cfg.peft.init_lora_weights):  # other processes keep theirs out of the run
        initial = (
            run / ".init" if main else Path(tempfile.mkdtemp(prefix="llama-lora-init-"))
        ) / "adapter_init"
    setup = build.attach(loaded, world, initial, strategy=strategy, quiet=quiet or not main)
    for note in setup.notes:
        say(note)
    say(_model_line(setup, world))
    say(loaded.settings.describe())
    if status is not None:
        status.update(total_steps=len(setup.steps))

    training = Run(setup, strategy, run, quiet, log)
    if start_from is None:
        first, eval_before = 0, training.start()
    else:
        first, eval_before = training.restore(start_from)
    training.loop(first)
    summary = training.finish(eval_before)
    return TrainResult(summary, setup.peft_model, loaded.tokenizer, run, main)
