"""`infer` and `chat`: generation from a base model, base + adapter, or a merged model. Both take the one set
of generation options in `options`, with their own defaults."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llama_lora.cli import core
from llama_lora.cli.options import (
    REPETITION_PENALTY,
    SEED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    AdapterOpt,
    BaseOpt,
    DeviceOpt,
    GenPrecisionOpt,
    MaxNewTokens,
    RepetitionPenalty,
    Sample,
    Seed,
    Temperature,
    ToolsOpt,
    TopK,
    TopP,
    generation_settings,
)
from llama_lora.errors import ConfigError


@core.app.command()
def infer(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    prompts_file: Annotated[
        str | None, typer.Option(help="JSONL/JSON/CSV rows in any training format.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="JSONL for --prompts-file results (default: stdout).")
    ] = None,
    max_new_tokens: MaxNewTokens = 256,
    sample: Sample = False,
    temperature: Temperature = TEMPERATURE,
    top_p: TopP = TOP_P,
    top_k: TopK = TOP_K,
    repetition_penalty: RepetitionPenalty = REPETITION_PENALTY,
    seed: Seed = SEED,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    template: Annotated[
        str | None, typer.Option(help="Override the prompt template (chat or alpaca).")
    ] = None,
    device: DeviceOpt = "auto",
    tools: ToolsOpt = None,
    precision: GenPrecisionOpt = "auto",
) -> None:
    """Generate with a base model, base + adapter, or a merged model. Stops at the end-of-turn token."""
    from llama_lora.data import tool_calls
    from llama_lora.infer import frontends, generate, loading

    settings = generation_settings(
        max_new_tokens, sample, temperature, top_p, top_k, repetition_penalty, seed
    )
    tool_schemas = tool_calls.load_tools(tools) if tools else None
    if prompts_file:
        rows = frontends.prompt_rows(prompts_file)
    elif prompt is None:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ConfigError("infer: no prompt given (argument, stdin or --prompts-file)")
    loaded = loading.load(
        base=base, adapter=adapter, device=device, template=template, log=core.err.print, precision=precision
    )
    loaded.tools = tool_schemas
    if prompts_file:
        _infer_rows(loaded, rows, settings, prompts_file, output)
        return
    messages = [{"role": "user", "content": prompt}]
    if stream:
        generate.generate(loaded, messages, settings, stream=frontends.stdout_writer)
        sys.stdout.write("\n")
    else:
        core.out.print(generate.generate(loaded, messages, settings).text, markup=False, highlight=False)


def _infer_rows(loaded, rows, settings, prompts_file: str, output: str | None) -> None:
    """`infer --prompts-file`: one JSON line per row, to --output or stdout."""
    from llama_lora.infer import frontends

    sink = open(output, "w") if output else sys.stdout  # noqa: SIM115 - closed below
    try:
        written = frontends.generate_rows(
            loaded, rows, settings, sink, where=f"--prompts-file: {prompts_file}"
        )
    finally:
        if output:
            sink.close()
    if output:
        core.err.print(f"wrote {written} generations to {output}")


@core.app.command()
def chat(
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    max_new_tokens: MaxNewTokens = 512,
    sample: Sample = True,
    temperature: Temperature = TEMPERATURE,
    top_p: TopP = TOP_P,
    top_k: TopK = TOP_K,
    repetition_penalty: RepetitionPenalty = REPETITION_PENALTY,
    seed: Seed = SEED,
    system: Annotated[str | None, typer.Option(help="System prompt for the conversation.")] = None,
    device: DeviceOpt = "auto",
    tools: ToolsOpt = None,
    precision: GenPrecisionOpt = "auto",
) -> None:
    """Interactive multi-turn chat with streaming. Commands: /reset clears the history, /exit quits."""
    from llama_lora.data import tool_calls
    from llama_lora.infer import frontends, loading

    settings = generation_settings(
        max_new_tokens, sample, temperature, top_p, top_k, repetition_penalty, seed
    )
    tool_schemas = tool_calls.load_tools(tools) if tools else None
    loaded = loading.load(base=base, adapter=adapter, device=device, log=core.err.print, precision=precision)
    loaded.tools = tool_schemas
    if system:
        loaded.system_prompt = system
    core.err.print(
        f"chatting with {loaded.description} ({loaded.template} template). /reset clears, /exit quits."
    )
    frontends.chat_session(
        loaded, settings, read=lambda: input("you> "), note=lambda text: core.err.print(text, markup=False)
    )
