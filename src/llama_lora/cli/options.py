"""Options and arguments more than one command takes, declared once: the config arguments, the model
options, and the generation options of `infer` and `chat`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llama_lora.config import Config, load_config
from llama_lora.errors import ConfigError

if TYPE_CHECKING:
    from llama_lora.infer.generate import GenerationSettings

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


AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", "-a", help="Run directory or adapter directory.")
]
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        "--model",
        "-m",
        help="Base model (hub id, directory, .gguf, alias) or a merged "
        "model directory; with --adapter it overrides the base recorded in the run.",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")]
GenPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Generation's decode steps: auto (bf16 where the hardware computes it natively), bf16 or fp32.",
    ),
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Benchmark rows per task (per subject for mmlu).")]
ToolsOpt = Annotated[
    str | None,
    typer.Option(
        "--tools",
        help="JSON file of tool schemas (OpenAI function schemas, or ShareGPT's JSON string) offered in "
        "the prompt, rendered as training renders them.",
    ),
]

# The generation options of `infer` and `chat`: names, flags, help and bounds here; each command's signature
# gives the defaults (infer: 256 tokens, greedy; chat: 512 tokens, sampling) and passes the values, in this
# order, to `generation_settings`.
MaxNewTokens = Annotated[int, typer.Option(min=1)]
Sample = Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float, typer.Option(min=0.0)]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0)]
TopK = Annotated[int, typer.Option(min=0)]
RepetitionPenalty = Annotated[float, typer.Option(min=0.0)]
Seed = Annotated[int, typer.Option()]
TEMPERATURE, TOP_P, TOP_K, REPETITION_PENALTY, SEED = 0.7, 0.9, 50, 1.0, 0  # the defaults both share


def generation_settings(
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int,
) -> GenerationSettings:
    from llama_lora.infer.generate import GenerationSettings

    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        greedy=not sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
