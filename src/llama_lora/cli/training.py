"""Before and during training: `train`, `config show|presets`, `data inspect`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llama_lora.cli import core
from llama_lora.cli.options import Args, Preset, resolve_config
from llama_lora.config import preset_names
from llama_lora.errors import ConfigError


@core.app.command()
def train(
    args: Args = None,
    preset: Preset = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="[CHECKPOINT]",
            help="Continue the run in output.dir from its latest checkpoint, or from the one named "
            "(checkpoint-6 or a path to it).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or progress messages.")
    ] = False,
) -> None:
    """Train a LoRA/DoRA adapter. Writes config.yaml, adapter/, metrics.jsonl, train_summary.json, loss.png."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: replace the run or continue it")
    cfg = resolve_config(args, preset)
    from llama_lora.train.loop import train as run_training

    result = run_training(cfg, overwrite=overwrite, quiet=quiet, log=core.err.print, resume=resume)
    if not result.main:  # another process of a data-parallel run: the main one reports
        return
    summary = result.summary
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    evals = f"eval loss {before:.4f} -> {after:.4f}; " if before is not None and after is not None else ""
    was, now = summary.get("held_out_before") or {}, summary.get("held_out") or {}
    evals += "".join(
        f"held-out {k.removeprefix('eval_')} {was[k]:.3f} -> {v:.3f}; " for k, v in now.items() if k in was
    )
    core.out.print(
        f"done: {summary['steps']} steps in {summary['runtime_s']:.0f}s, {summary['tokens_per_second']:.0f} tok/s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; {evals}adapter in {Path(cfg.output.dir) / 'adapter'}"
    )


@core.config_app.command("show")
def config_show(args: Args = None, preset: Preset = None) -> None:
    """Print the resolved configuration as YAML (defaults <- preset <- file <- overrides)."""
    core.out.print(resolve_config(args, preset).to_yaml(), end="", highlight=False, markup=False)


@core.config_app.command("presets")
def config_presets() -> None:
    """List the presets shipped with llama-lora."""
    for name in preset_names():
        core.out.print(name)


@core.data_app.command("inspect")
def data_inspect(
    args: Args = None,
    preset: Preset = None,
    n: Annotated[int, typer.Option("--n", min=0, help="Training examples to show.")] = 3,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON Lines: one object per example (index, tokens, trained_tokens, truncated, segments: "
            '[{"text", "trained"}]; under dpo/orpo one per side of each pair, with side: chosen or rejected; '
            "under kto, side: desirable or undesirable; under grpo, side: prompt, the prompt as generation "
            "sees it), "
            'then one {"summary": counts, "warnings": [{"kind", "message"}]}.',
        ),
    ] = False,
) -> None:
    """Show N training examples exactly as `train` would build them (same config, template, masking,
    truncation): trained text green on a terminal, between « and » otherwise; then row/token counts and
    warnings. Writes nothing."""
    cfg = resolve_config(args, preset)
    from llama_lora.data import inspection

    report = inspection.inspect(cfg, n)
    if as_json:
        sys.stdout.write("".join(line + "\n" for line in inspection.json_lines(report)))
        return
    out = core.out
    for item in inspection.render(report, color=out.is_terminal and not out.no_color):
        out.print(item)
