"""The typer app and its groups, the root options (`--version`, `--verbose`), the consoles, and `main()`: argv
normalisation, exit codes and the one-line usage errors. The commands register themselves on `app` from the
sibling modules, which `llama_lora.cli` imports.

Every error the user can fix (config, data, model, hub) is one message on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console

from llama_lora import __version__
from llama_lora.errors import LlamaLoraError

app = typer.Typer(
    help="Fine-tune Llama-family instruct models with LoRA/DoRA: train, evaluate, chat, merge, export.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configurations and presets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
export_app = typer.Typer(help="Export a merged model for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")
data_app = typer.Typer(help="Look at the training data as `train` builds it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Commands print through `core.out` / `core.err`, read when they run (not imported by name): replacing one
# here (a test swapping the console) reaches every command.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# The root `--verbose` option: the libraries' own progress bars and warnings stay on. Set by `root()`;
# commands read it as `core._verbose` when they run.
_verbose = False


def _quiet_libraries() -> None:
    """Silence the libraries underneath (transformers' weight loading, GGUF de-quantization, PEFT's and
    torch's warnings) unless `--verbose`; llama-lora's own progress and messages are not affected."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _verbose:
        return
    # tqdm reads TQDM_* once, when it is first imported: the root callback runs before any command imports it
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


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
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show the progress bars and warnings of the libraries underneath."
        ),
    ] = False,
) -> None:
    """llama-lora: fine-tune, evaluate and ship LoRA/DoRA adapters for Llama-family models."""
    global _verbose
    _verbose = verbose
    _quiet_libraries()


def optional_resume_value(argv: list[str]) -> list[str]:
    """`--resume` alone means the latest checkpoint. A following word is its value only when it is neither
    an option, an override (`key=value`) nor a config file."""
    out = list(argv)
    for i, item in enumerate(out):
        if item == "--resume":
            following = out[i + 1] if i + 1 < len(out) else "-"
            names_one = not following.startswith("-") and "=" not in following
            if not names_one or following.endswith((".yaml", ".yml")):
                out[i] = "--resume=latest"
    return out


def verbose_first(argv: list[str]) -> list[str]:
    """`--verbose` may stand anywhere (`llama-lora train my.yaml --verbose`); it is the root's option."""
    if "--verbose" not in argv:
        return argv
    return ["--verbose", *(a for a in argv if a != "--verbose")]


def _click_class(exc: BaseException) -> str | None:
    """'usage' for a command-line usage error (unknown option or command, missing or bad value), 'abort' for
    click's Ctrl-C/EOF, else None. typer raises click's classes from the `click` package in older releases
    and from its own copy (`typer._click`) since 0.2x, so they are recognised wherever they live."""
    for cls in type(exc).__mro__:
        if cls.__module__.endswith("click.exceptions"):
            if cls.__name__ == "ClickException":
                return "usage"
            if cls.__name__ == "Abort":
                return "abort"
    return None


def command_path(argv: list[str]) -> str:
    """`llama-lora export gguf` for argv `export gguf --bad`: the (sub)command words at the front of argv.
    Some usage errors carry no context to say which command they came from."""
    command, words = typer.main.get_command(app), ["llama-lora"]
    for word in argv:
        sub = getattr(command, "commands", {}).get(word)
        if word.startswith("-") or sub is None:
            break
        command, words = sub, [*words, word]
    return " ".join(words)


def usage_message(exc: Exception, argv: list[str]) -> str:
    """One line: the command, what is wrong, the closest known option for a mistyped one, where help is."""
    text = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    wrong, known = getattr(exc, "option_name", None), getattr(exc, "possibilities", None)
    if wrong and known is not None:  # click's own hint lists loose matches ("Possible options: ..."): one
        close = difflib.get_close_matches(wrong, list(known), n=1, cutoff=0.7)
        text = f"No such option: {wrong}" + (f"; did you mean {close[0]}?" if close else "")
    command = command_path(argv)
    return f"error: {command}: {text} (see `{command} --help`)"


def main() -> None:
    """The `llama-lora` console script. Run it as `llama_lora.cli.main`: importing the package registers the
    commands on `app`."""
    argv = verbose_first(optional_resume_value(sys.argv[1:]))
    try:
        app(args=argv, standalone_mode=False)
    except LlamaLoraError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click's usage errors arrive here in non-standalone mode
        kind = _click_class(exc)
        if kind == "abort":
            sys.exit(130)
        if kind is None:
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the command's help already
            err.print(
                usage_message(exc, [a for a in argv if a != "--verbose"]), markup=False, highlight=False
            )
        sys.exit(getattr(exc, "exit_code", 2) or 2)
