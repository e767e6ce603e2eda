"""The `llama-lora` command: subcommands, argument parsing, exit codes, error printing. No ML logic.

Every error the user can fix (config, data, model, hub) is one message on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
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
export_app = typer.Typer(help="Export a merged model for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")
data_app = typer.Typer(help="Look at the training data as `train` builds it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
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


_verbose = False  # the root `--verbose` option: the libraries' own progress bars and warnings stay on


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


@app.command()
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

    result = run_training(cfg, overwrite=overwrite, quiet=quiet, log=err.print, resume=resume)
    if not result.main:  # another process of a data-parallel run: the main one reports
        return
    summary = result.summary
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    evals = f"eval loss {before:.4f} -> {after:.4f}; " if before is not None and after is not None else ""
    out.print(
        f"done: {summary['steps']} steps in {summary['runtime_s']:.0f}s, {summary['tokens_per_second']:.0f} tok/s, "
        f"peak memory {summary['peak_memory_mb']:.0f} MB; {evals}adapter in {Path(cfg.output.dir) / 'adapter'}"
    )


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
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Benchmark rows per task (per subject for mmlu).")]
ToolsOpt = Annotated[
    str | None,
    typer.Option(
        "--tools",
        help="JSON file of tool schemas (OpenAI function schemas, or ShareGPT's JSON string) offered in "
        "the prompt, rendered as training renders them.",
    ),
]


def _settings(max_new_tokens, sample, temperature, top_p, top_k, repetition_penalty, seed):
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


@app.command()
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
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    top_k: Annotated[int, typer.Option(min=0)] = 50,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: int = 0,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    template: Annotated[
        str | None, typer.Option(help="Override the prompt template (chat or alpaca).")
    ] = None,
    device: DeviceOpt = "auto",
    tools: ToolsOpt = None,
) -> None:
    """Generate with a base model, base + adapter, or a merged model. Stops at the end-of-turn token."""
    from llama_lora.data import formats
    from llama_lora.infer import frontends, generate, loading

    settings = _settings(max_new_tokens, sample, temperature, top_p, top_k, repetition_penalty, seed)
    tool_schemas = formats.load_tools(tools) if tools else None
    if prompts_file:
        rows = frontends.prompt_rows(prompts_file)
    elif prompt is None:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise ConfigError("infer: no prompt given (argument, stdin or --prompts-file)")
    loaded = loading.load(base=base, adapter=adapter, device=device, template=template, log=err.print)
    loaded.tools = tool_schemas
    if not prompts_file:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            generate.generate(loaded, messages, settings, stream=frontends.stdout_writer)
            sys.stdout.write("\n")
        else:
            out.print(generate.generate(loaded, messages, settings).text, markup=False, highlight=False)
        return
    sink = open(output, "w") if output else sys.stdout  # noqa: SIM115 - closed below
    try:
        written = frontends.generate_rows(
            loaded, rows, settings, sink, where=f"--prompts-file: {prompts_file}"
        )
    finally:
        if output:
            sink.close()
    if output:
        err.print(f"wrote {written} generations to {output}")


@app.command()
def chat(
    adapter: AdapterOpt = None,
    base: BaseOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 512,
    sample: Annotated[bool, typer.Option("--sample/--greedy")] = True,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    system: Annotated[str | None, typer.Option(help="System prompt for the conversation.")] = None,
    device: DeviceOpt = "auto",
    tools: ToolsOpt = None,
) -> None:
    """Interactive multi-turn chat with streaming. Commands: /reset clears the history, /exit quits."""
    from llama_lora.data import formats
    from llama_lora.infer import frontends, loading

    settings = _settings(max_new_tokens, sample, temperature, top_p, top_k, repetition_penalty, seed)
    tool_schemas = formats.load_tools(tools) if tools else None
    loaded = loading.load(base=base, adapter=adapter, device=device, log=err.print)
    loaded.tools = tool_schemas
    if system:
        loaded.system_prompt = system
    err.print(f"chatting with {loaded.description} ({loaded.template} template). /reset clears, /exit quits.")
    frontends.chat_session(
        loaded, settings, read=lambda: input("you> "), note=lambda text: err.print(text, markup=False)
    )


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="Run directory or adapter directory.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", "-o", help="Merged model directory (default RUN_DIR/merged).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="auto (the base's dtype), float32, bfloat16 or float16.")
    ] = "auto",
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Fold the adapter into the base weights, verify merged == unmerged, write merge_report.json."""
    from llama_lora.export.merge import merge as run_merge

    report = run_merge(adapter, out=out_dir, dtype=dtype, base=base, device=device, log=err.print)
    out.print(
        f"merged model in {report['merged_dir']} ({report['dtype']}): max |logit diff| "
        f"{report['max_abs_logit_diff']:.2e}, greedy agreement {report['greedy_token_agreement']:.0%}; "
        f"report in {report['merged_dir']}/merge_report.json"
    )


@app.command()
def compare(
    adapter: Annotated[str, typer.Argument(help="Run directory or adapter directory.")],
    data_file: Annotated[
        str | None, typer.Option("--data", help="Held-out rows (default: the run's eval split).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of prompts.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    base: BaseOpt = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Where reports go (default: the run directory).")
    ] = None,
    device: DeviceOpt = "auto",
    benchmarks: Annotated[
        str | None, typer.Option(help="Also lm-eval tasks, comma-separated (a 'general skills' section).")
    ] = None,
    limit: LimitOpt = None,
    bench_data: Annotated[
        str | None, typer.Option(help="Benchmark files for --benchmarks (as eval's --data-dir).")
    ] = None,
) -> None:
    """Base model vs adapter on held-out prompts: loss, perplexity, ROUGE-L, probe; writes report.html."""
    from rich.table import Table

    from llama_lora.evaluate.compare import compare as run_compare
    from llama_lora.evaluate.report import metric_rows

    result = run_compare(
        adapter,
        data_file=data_file,
        n=n,
        max_new_tokens=max_new_tokens,
        base=base,
        device=device,
        out_dir=out_dir,
        benchmarks=benchmarks,
        bench_limit=limit,
        bench_data=bench_data,
        verbose=_verbose,
        log=err.print,
    )
    table = Table(title=f"base vs adapter on {result['n']} held-out prompts")
    for col in ("metric", "base", "adapter", ""):
        table.add_column(col, justify="right" if col in ("base", "adapter") else "left")
    for label, b, a, verdict in metric_rows(result):
        table.add_row(label, f"{b:.4f}", f"{a:.4f}", verdict)
    out.print(table)
    if result.get("benchmarks"):
        _benchmark_table(result["benchmarks"])
    out.print("reports: " + ", ".join(result["files"]))


def _benchmark_table(result: dict) -> None:
    from rich.table import Table

    from llama_lora.evaluate.lmeval import table_rows

    paired = "comparison" in result
    cols = ("task", "metric", "base", "adapter", "delta", "") if paired else ("task", "metric", "score")
    table = Table(
        title="general skills (lm-evaluation-harness)"
        + (f", {result['limit']} rows each" if result["limit"] else "")
    )
    for col in cols:
        table.add_column(col)
    for row in table_rows(result):
        table.add_row(*row)
    out.print(table)


@app.command("eval")
def eval_command(
    target: Annotated[
        str, typer.Argument(help="Run directory (base vs adapter) or a model (evaluated alone).")
    ],
    tasks: Annotated[str, typer.Option(help="lm-eval tasks, comma-separated: arc_easy,piqa,mmlu,...")],
    limit: LimitOpt = None,
    data_dir: Annotated[
        str | None, typer.Option(help="The benchmarks' original files (offline); default: the hub.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 16,
    precision: Annotated[str, typer.Option(help="auto (bf16 where native), bf16, fp16 or fp32.")] = "auto",
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the results here (default: RUN_DIR/eval.json).")
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Standard benchmarks (lm-evaluation-harness) on the base and on base + adapter: what did tuning cost?"""
    from llama_lora.evaluate.lmeval import evaluate

    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"--precision: {precision!r} is not one of auto, bf16, fp16, fp32")
    result = evaluate(
        target,
        tasks,
        limit,
        data_dir,
        batch_size,
        precision,
        json_out,
        device,
        verbose=_verbose,
        log=err.print,
    )
    _benchmark_table(result)
    if result.get("file"):
        out.print(f"results: {result['file']}", markup=False)


@app.command()
def runs(
    root: Annotated[str, typer.Argument(help="Where to look for run directories (2 levels down).")] = "runs",
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List run directories with model, data, method, eval loss before -> after, tokens/s, status."""
    from llama_lora.evaluate.report import runs_table
    from llama_lora.run_dir import list_runs

    rows = list_runs(Path(root))
    if as_json:
        import json

        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rows:
        out.print(f"no runs under {root} (train one with `llama-lora train`)", markup=False)
    else:
        out.print(runs_table(rows))


@app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="Base model or a run directory.")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "-a", help="NAME=RUN_DIR")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(help="Or env LLAMA_LORA_API_KEY.")] = None,
) -> None:
    """OpenAI-compatible server for a base model and its adapters (docs/elsewhere.md)."""
    from llama_lora.infer.serve import serve as run_server

    run_server(model, adapter or [], host=host, port=port, api_key=api_key)


@export_app.command("gguf")
def export_gguf(
    source: Annotated[
        str, typer.Argument(help="Merged model directory, or a run directory (uses RUN_DIR/merged).")
    ],
    out_file: Annotated[
        str | None, typer.Option("--out", "-o", help="The .gguf file (default RUN_DIR/model-TYPE.gguf).")
    ] = None,
    kind: Annotated[str, typer.Option("--type", help="f16 or q8_0.")] = "f16",
) -> None:
    """Write a GGUF file for llama.cpp plus an Ollama Modelfile; verify it by loading it back."""
    from llama_lora.export import gguf_model

    out.print(
        gguf_model.summary(gguf_model.export_gguf(source, out=out_file, kind=kind, log=err.print)),
        markup=False,
    )


@export_app.command("gguf-adapter")
def export_gguf_adapter(
    run: Annotated[str, typer.Argument(help="A LoRA run directory (or its adapter directory).")],
    out_file: Annotated[str | None, typer.Option("--out", "-o", help="The adapter .gguf file.")] = None,
    base_gguf: Annotated[
        str | None, typer.Option("--base-gguf", help="Use this base GGUF; write none.")
    ] = None,
) -> None:
    """Write a LoRA adapter as a llama.cpp GGUF adapter (+ base GGUF, Modelfile); verify it on the base."""
    from llama_lora.export import gguf_adapter

    out.print(
        gguf_adapter.summary(gguf_adapter.export_gguf_adapter(run, out_file, base_gguf, log=err.print)),
        markup=False,
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


@data_app.command("inspect")
def data_inspect(
    args: Args = None,
    preset: Preset = None,
    n: Annotated[int, typer.Option("--n", min=0, help="Training examples to show.")] = 3,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON Lines: one object per example (index, tokens, trained_tokens, truncated, segments: "
            '[{"text", "trained"}]), then one {"summary": counts, "warnings": [{"kind", "message"}]}.',
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
    for item in inspection.render(report, color=out.is_terminal and not out.no_color):
        out.print(item)


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


if __name__ == "__main__":
    main()
