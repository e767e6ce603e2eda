"""The `llama-lora` command: subcommands, argument parsing, exit codes, error printing. No ML logic.

`core` holds the typer app, the root options, the consoles and `main()`; `training`, `generation` and
`results` register their commands on it when imported (here). The consoles and `--verbose` live in `core`
(`core.out`, `core.err`, `core._verbose`), read by the commands when they run. Importing this package imports
no torch: the commands import what they need when they run.
"""

from __future__ import annotations

# Importing a module registers its commands; `llama-lora --help` lists them in this order.
# isort: off
from llama_lora.cli import core, training, generation, results  # noqa: F401

# isort: on
from llama_lora.cli.core import _click_class, app, main

__all__ = ["_click_class", "app", "main"]
