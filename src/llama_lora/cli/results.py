"""After training: `merge`, `compare`, `eval`, `runs`, `dashboard`, `serve`, `export gguf|gguf-adapter`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llama_lora.cli import core
from llama_lora.cli.options import BaseOpt, DeviceOpt, GenPrecisionOpt, LimitOpt
from llama_lora.errors import ConfigError


@core.app.command()
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

    report = run_merge(adapter, out=out_dir, dtype=dtype, base=base, device=device, log=core.err.print)
    core.out.print(
        f"merged model in {report['merged_dir']} ({report['dtype']}): max |logit diff| "
        f"{report['max_abs_logit_diff']:.2e}, greedy agreement {report['greedy_token_agreement']:.0%}; "
        f"report in {report['merged_dir']}/merge_report.json"
    )


@core.app.command()
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
    precision: GenPrecisionOpt = "auto",
) -> None:
    """Base model vs adapter on held-out prompts: loss, perplexity, ROUGE-L, probe; writes report.html."""
    from llama_lora.evaluate.compare import compare as run_compare

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
        precision=precision,
        verbose=core._verbose,
        log=core.err.print,
    )
    _metric_table(result)
    if result.get("benchmarks"):
        _benchmark_table(result["benchmarks"])
    core.out.print("reports: " + ", ".join(result["files"]))


def _metric_table(result: dict) -> None:
    from rich.table import Table

    from llama_lora.evaluate.report import metric_rows

    table = Table(title=f"base vs adapter on {result['n']} held-out prompts")
    for col in ("metric", "base", "adapter", ""):
        table.add_column(col, justify="right" if col in ("base", "adapter") else "left")
    for label, b, a, verdict in metric_rows(result):
        table.add_row(label, f"{b:.4f}", f"{a:.4f}", verdict)
    core.out.print(table)


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
    core.out.print(table)


@core.app.command("eval")
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
        verbose=core._verbose,
        log=core.err.print,
    )
    _benchmark_table(result)
    if result.get("file"):
        core.out.print(f"results: {result['file']}", markup=False)


@core.app.command()
def runs(
    root: Annotated[str, typer.Argument(help="Where to look for run directories (2 levels down).")] = "runs",
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON, for scripts.")] = False,
) -> None:
    """List run directories with model, data, method, eval loss before -> after, tokens/s, status."""
    from llama_lora.evaluate.report import runs_table
    from llama_lora.run_status import list_runs

    rows = list_runs(Path(root))
    if as_json:
        import json

        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rows:
        core.out.print(f"no runs under {root} (train one with `llama-lora train`)", markup=False)
    else:
        core.out.print(runs_table(rows))


@core.app.command()
def dashboard(
    root: Annotated[
        str, typer.Argument(metavar="RUNS_DIR", help="The runs directory (runs 2 levels down are listed).")
    ] = "runs",
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: Annotated[
        str | None, typer.Option(help="Or env LLAMA_LORA_API_KEY; open the page with ?key=KEY.")
    ] = None,
) -> None:
    """A local web page over the runs: live curves, state, config, data, reports, artifacts, compare, chat."""
    from llama_lora.dashboard.app import dashboard as run_dashboard

    run_dashboard(Path(root), host=host, port=port, api_key=api_key, log=core.err.print)


@core.app.command()
def serve(
    model: Annotated[str | None, typer.Argument(help="Base model or a run directory.")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "-a", help="NAME=RUN_DIR")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(help="Or env LLAMA_LORA_API_KEY.")] = None,
    max_sequences: Annotated[
        int, typer.Option(min=1, max=256, help="Requests decoding together in one batch.")
    ] = 16,
    max_waiting: Annotated[
        int, typer.Option(min=0, max=100_000, help="Requests waiting for a place; more get 503.")
    ] = 64,
    allow_adapter_updates: Annotated[
        bool,
        typer.Option(help="Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (API key applies)."),
    ] = False,
    precision: GenPrecisionOpt = "auto",
) -> None:
    """OpenAI-compatible server for a base model and its adapters (docs/elsewhere.md)."""
    from llama_lora.infer.serve import serve as run_server

    run_server(
        model,
        adapter or [],
        host=host,
        port=port,
        api_key=api_key,
        max_sequences=max_sequences,
        max_waiting=max_waiting,
        allow_adapter_updates=allow_adapter_updates,
        precision=precision,
    )


@core.export_app.command("gguf")
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

    core.out.print(
        gguf_model.summary(gguf_model.export_gguf(source, out=out_file, kind=kind, log=core.err.print)),
        markup=False,
    )


@core.export_app.command("gguf-adapter")
def export_gguf_adapter(
    run: Annotated[str, typer.Argument(help="A LoRA run directory (or its adapter directory).")],
    out_file: Annotated[str | None, typer.Option("--out", "-o", help="The adapter .gguf file.")] = None,
    base_gguf: Annotated[
        str | None, typer.Option("--base-gguf", help="Use this base GGUF; write none.")
    ] = None,
) -> None:
    """Write a LoRA adapter as a llama.cpp GGUF adapter (+ base GGUF, Modelfile); verify it on the base."""
    from llama_lora.export import gguf_adapter

    core.out.print(
        gguf_adapter.summary(gguf_adapter.export_gguf_adapter(run, out_file, base_gguf, log=core.err.print)),
        markup=False,
    )
