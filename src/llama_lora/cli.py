"""The `llama-lora` command: subcommands, argument parsing, exit codes, error printing. No ML logic.

Every error the user can fix (config, data, model, hub) is one message on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llama_lora import __version__
from llama_lora.config import Config, load_config, preset_names
from llama_lora.errors import ConfigError, LlamaLoraError

app = typer.Typer(
    help="Fine-tune Llama-family instruct models with LoRA/DoRA: train, evaluate, chat, merge, export.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configurations and presets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ARGS_HELP = "An optional CONFIG.yaml, then key.path=value overrides (values parse as YAML)."
Args = Annotated[list[str] | None, typer.Argument(help=ARGS_HELP, show_default=False)]
Preset = Annotated[
    str | None, typer.Option("--preset", "-p", help="Start from a shipped preset (see `config presets`).")
]


def split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """First non-override argument is the config file; everything with '=' is an override."""
    path, overrides = None, []
    for item in args or []:
        if "=" in item:
            overrides.append(item)
        elif path is None:
            path = item
        else:
            raise ConfigError(f"{item}: only one config file may be given (overrides look like key=value)")
    return path, overrides


def resolve_config(args: list[str] | None, preset: str | None) -> Config:
    path, overrides = split_args(args)
    return load_config(path, overrides, preset)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command()
def train(
    args: Args = None,
    preset: Preset = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output.dir.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or progress messages.")
    ] = False,
) -> None:
    """Train a LoRA/DoRA adapter. Writes config.yaml, adapter/, metrics.jsonl, train_summary.json, loss.png."""
    cfg = resolve_config(args, preset)
    _quiet_libraries()
    from llama_lora.train import train as run_training

    summary = run_training(cfg, overwrite=overwrite, quiet=quiet, log=err.print).summary
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    evals = f"eval loss {before:.4f} -> {after:.4f}; " if before is not None and after is not None else ""
    out.print(
        f"done: {summary['steps']} steps in {summary['runtime_s']:.0f}s, {summary['tokens_per_second']:.0f} tok/s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; {evals}adapter in {Path(cfg.output.dir) / 'adapter'}"
    )


@config_app.command("show")
def config_show(args: Args = None, preset: Preset = None) -> None:
    """Print the resolved configuration as YAML (defaults <- preset <- file <- overrides)."""
    out.print(resolve_config(args, preset).to_yaml(), end="", highlight=False, markup=False)


@config_app.command("presets")
def config_presets() -> None:
    """List the presets shipped with llama-lora."""
    for name in preset_names():
        out.print(name)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"llama-lora {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """llama-lora: fine-tune, evaluate and ship LoRA/DoRA adapters for Llama-family models."""


def main() -> None:
    try:
        app(standalone_mode=False)
    except LlamaLoraError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
