"""The command line as a user meets it: usage errors (a mistyped option, a missing argument or value, an unknown
command) are one short line on stderr and exit status 2, whatever typer/click release is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from llama_lora import cli
from tests.conftest import run_in_process


def leaf_commands() -> list[tuple[list[str], bool]]:
    """(words, has a required argument) for every command `llama-lora` has, subcommands of groups included."""
    found = []

    def walk(command, words):
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*words, name])
            return
        required = any(p.required and p.param_type_name == "argument" for p in command.params)
        found.append((words, required))

    walk(typer.main.get_command(cli.app), [])
    return found


COMMANDS = leaf_commands()


def one_line_usage_error(result, command: str, wanted: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(lines) == 1 and len(lines[0]) < 200, result.stderr
    assert lines[0].startswith(f"error: llama-lora{command}: {wanted}"), lines[0]


def test_the_command_tree_is_what_the_docs_list():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"train", "infer", "chat", "serve", "merge", "export gguf", "data inspect", "config show"} <= names


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_a_mistyped_option_is_one_line_exit_2(words):
    result = run_in_process(*words, "--no-such-option")
    one_line_usage_error(result, "".join(f" {w}" for w in words), "No such option: --no-such-option")


@pytest.mark.parametrize("words", [w for w, required in COMMANDS if required], ids=" ".join)
def test_a_missing_argument_is_one_line_exit_2(words):
    result = run_in_process(*words)
    one_line_usage_error(result, "".join(f" {w}" for w in words), "Missing argument")


@pytest.mark.parametrize(
    "args, wanted",
    [
        (["serve", "runs/x", "--prot", "8000"], "No such option: --prot; did you mean --port?"),
        (["export", "gguf", "runs/x", "--typ", "q8_0"], "No such option: --typ; did you mean --type?"),
        (["data", "inspect", "--n"], "Option '--n' requires an argument"),
        (["data", "inspect", "--n", "many"], "Invalid value for '--n'"),
        (["infer", "--max-new-tokens", "0", "hi"], "Invalid value for '--max-new-tokens'"),
        (["--verbose", "infer", "--nope"], "No such option: --nope"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_name_the_command_and_suggest(args, wanted):
    result = run_in_process(*args)
    words = [a for a in args if not a.startswith("-")][:2]
    known = {" ".join(w) for w, _ in COMMANDS} | {"export", "data"}
    command = " ".join(words) if " ".join(words) in known else (words[0] if words[0] in known else "")
    one_line_usage_error(result, f" {command}" if command else "", wanted)


def test_a_group_without_its_subcommand_shows_its_help_and_exits_2():
    result = run_in_process("export")
    assert result.returncode == 2 and "gguf-adapter" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stderr


def test_unrelated_exceptions_are_not_taken_for_usage_errors():
    class ClickException(Exception):  # same name, not click's module
        pass

    assert cli._click_class(ClickException("x")) is None
    assert cli._click_class(ValueError("x")) is None


# The eight commands of the report, through the installed `llama-lora` script in a new process each.
REPORTED = [
    "train --preset demo --bogus-option",
    "infer --adapter runs/x --nope",
    "serve runs/x --prot 8000",
    "merge",
    "export gguf",
    "eval",
    "data inspect --n",
    "no-such-command",
]


def installed_script() -> str:
    beside = Path(sys.executable).with_name("llama-lora")
    found = str(beside) if beside.exists() else shutil.which("llama-lora")
    assert found, "the llama-lora console script is not installed (make install)"
    return found


@pytest.mark.parametrize("line", REPORTED)
def test_reported_usage_errors_through_the_installed_script(line):
    result = subprocess.run([installed_script(), *line.split()], capture_output=True, text=True, timeout=120)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: llama-lora"), result.stderr


GENERATION = ["max_new_tokens", "sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed"]


def test_infer_and_chat_share_the_generation_options_with_their_own_defaults():
    commands = typer.main.get_command(cli.app).commands
    infer, chat = ({p.name: p for p in commands[name].params} for name in ("infer", "chat"))

    def spec(option):  # what typer/click releases all have; the bounds are checked below by use
        return option.opts, option.secondary_opts, option.help

    assert [spec(infer[name]) for name in GENERATION] == [spec(chat[name]) for name in GENERATION]
    defaults = [(infer[name].default, chat[name].default) for name in GENERATION]
    assert defaults == [(256, 512), (False, True), (0.7, 0.7), (0.9, 0.9), (50, 50), (1.0, 1.0), (0, 0)]


@pytest.mark.parametrize("command", ["infer", "chat"])
@pytest.mark.parametrize(
    "option, value",
    [("--top-p", "1.5"), ("--temperature", "-1"), ("--top-k", "-1"), ("--max-new-tokens", "0")],
)
def test_infer_and_chat_bound_the_generation_options_alike(command, option, value):
    result = run_in_process(command, option, value)
    one_line_usage_error(result, f" {command}", f"Invalid value for '{option}'")


def test_importing_the_cli_imports_no_torch():
    code = "import sys, llama_lora.cli; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
