"""report.md and a self-contained report.html (images embedded, no network needed) for `compare`."""

from __future__ import annotations

import base64
import html as html_lib
import io
from typing import Any

from llama_lora import run_dir

ROWS = [
    ("preference_accuracy", "held-out preference accuracy (chosen > rejected)", "higher"),
    ("preference_margin", "mean log-prob margin, chosen - rejected", "higher"),
    ("kto_margin", "mean log-prob margin, desirable - undesirable answers", "higher"),
    ("desirable_logp", "mean log-prob of the desirable answers", "higher"),
    ("undesirable_logp", "mean log-prob of the undesirable answers", "lower"),
    ("eval_loss", "eval loss (response tokens)", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("rouge_l", "ROUGE-L vs reference", "higher"),
    ("probe_rate", "behaviour probe hit rate", "higher"),
    ("stop_rate", "stopped on its own", "higher"),
    ("mean_generated_tokens", "mean generated tokens", None),
]


def metric_rows(result: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, base, adapter, verdict) for every metric both sides have."""
    base, adapter = result["base"], result["adapter_metrics"]
    rows = []
    rewards = [  # GRPO's; a 0/1 reward shows as its accuracy only
        k
        for k in adapter
        if k == "reward"
        or k.startswith("accuracy/")
        or (k.startswith("reward/") and "accuracy/" + k[7:] not in adapter)
    ]
    named = [(k, "held-out " + k.replace("/", " (") + (")" if "/" in k else ""), "higher") for k in rewards]
    for key, label, better in named + ROWS:
        if key not in base or key not in adapter:
            continue
        b, a = base[key], adapter[key]
        if better is None or a == b:
            verdict = ""
        else:
            verdict = "better" if (a < b) == (better == "lower") else "worse"
        rows.append((label, b, a, verdict))
    return rows


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Base model vs adapter",
        "",
        f"- base model: `{result['base_model']}`",
        f"- adapter: `{result['adapter']}`",
        f"- held-out data: {result['data']} ({result['n']} prompts, greedy, up to {result['max_new_tokens']} new tokens)",
    ]
    if result.get("probe"):
        lines.append(
            f"- behaviour probe: {result['probe']['name']}: {result['probe']['description']} "
            f"(pattern `{result['probe']['pattern']}`)"
        )
    if result.get("kto_reward_margin") is not None:
        lines.append(
            f"- KTO reward margin on the held-out answers (beta x the margin's change, base = reference): "
            f"{result['kto_reward_margin']:+.4f}"
        )
    lines += ["", "| metric | base | adapter | |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {label} | {_fmt(b)} | {_fmt(a)} | {v} |" for label, b, a, v in metric_rows(result)]
    lines += benchmarks_markdown(result.get("benchmarks"))
    lines += ["", "## Side by side", ""]
    for i, ex in enumerate(result["examples"][:12], 1):
        lines += [
            f"### {i}. {_one_line(ex['prompt'])}",
            "",
            f"- **reference:** {_one_line(ex['reference'])}",
            f"- **base:** {_one_line(ex['base'])}",
            f"- **adapter:** {_one_line(ex['adapter'])}",
            "",
        ]
    return "\n".join(lines) + "\n"


def benchmarks_markdown(bench: dict[str, Any] | None) -> list[str]:
    """The 'general skills' section: lm-eval's score per task, base vs adapter, with stderr and verdict."""
    if not bench:
        return []
    from llama_lora.evaluate.lmeval import table_rows

    rows = "rows each" if bench["limit"] else "full splits"
    lines = [
        "",
        "## General skills (lm-evaluation-harness)",
        "",
        f"lm-eval {bench['lm_eval_version']}, {bench['limit'] or 'all'} {rows}, {bench['dtype']}; a change counts "
        "(lost / gained) when it exceeds 2 standard errors of the difference.",
        "",
        "| task | metric | base | adapter | delta | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    return lines + [f"| {' | '.join(row)} |" for row in table_rows(bench)]


def _benchmark_chart(bench: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = bench["comparison"]
    names = list(comp)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.2), dpi=100)
    ys = range(len(names))
    for offset, side, color in ((-0.2, "base", "#9aa5b1"), (0.2, "adapter", "#3b6ea8")):
        ax.barh(
            [y + offset for y in ys],
            [comp[n][side] for n in names],
            height=0.4,
            xerr=[comp[n][f"{side}_stderr"] or 0 for n in names],
            label=side,
            color=color,
            capsize=3,
        )
    ax.set_yticks(list(ys), [f"{n} ({comp[n]['metric']})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _benchmarks_html(bench: dict[str, Any] | None) -> str:
    if not bench or "comparison" not in bench:
        return ""
    from llama_lora.evaluate.lmeval import table_rows

    esc = html_lib.escape
    body = "".join(
        "<tr>"
        + "".join(f"<td>{esc(c)}</td>" for c in row[:-1])
        + f"<td class='{row[-1]}'>{row[-1]}</td></tr>"
        for row in table_rows(bench)
    )
    scope = f"{bench['limit']} rows each" if bench["limit"] else "full splits"
    return (
        f"<h2>General skills (lm-evaluation-harness)</h2><p>lm-eval {esc(str(bench['lm_eval_version']))}, "
        f"{scope}, {bench['dtype']}; lost / gained: a change beyond 2 standard errors of the difference.</p>"
        "<table><tr><th>task</th><th>metric</th><th>base</th><th>adapter</th><th>delta</th><th></th></tr>"
        f"{body}</table><img alt='benchmarks' src='data:image/png;base64,{_benchmark_chart(bench)}'>"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def _bar_chart(result: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unbounded = ("mean generated tokens", "perplexity", "mean log-prob margin, chosen - rejected")
    rows = [r for r in metric_rows(result) if r[0] not in unbounded]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="base", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label="adapter", color="#3b6ea8")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _loss_chart(metrics: list[dict[str, Any]]) -> str | None:
    if not any(r.get("loss") is not None for r in metrics):
        return None
    buf = io.BytesIO()
    run_dir.plot_losses(metrics, buf, title="training")
    return base64.b64encode(buf.getvalue()).decode()


def html(result: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    esc = html_lib.escape
    table = "".join(
        f"<tr><td>{esc(label)}</td><td>{_fmt(b)}</td><td>{_fmt(a)}</td><td class='{v}'>{v}</td></tr>"
        for label, b, a, v in metric_rows(result)
    )
    examples = "".join(
        f"<tr><td>{esc(ex['prompt'])}</td><td>{esc(ex['reference'])}</td><td>{esc(ex['base'])}</td>"
        f"<td>{esc(ex['adapter'])}</td></tr>"
        for ex in result["examples"]
    )
    loss = _loss_chart(metrics)
    loss_img = f"<h2>Training</h2><img alt='loss curve' src='data:image/png;base64,{loss}'>" if loss else ""
    probe = result.get("probe")
    probe_line = f"<li>behaviour probe: {esc(probe['description'])}</li>" if probe else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llama-lora: base vs adapter</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ border: 1px solid #ccc; padding: .3rem .6rem;
vertical-align: top; }} th {{ background: #f2f4f7; }} .better, .gained {{ color: #1a7f37; }} .worse, .lost {{ color: #b42318; }}
td {{ white-space: pre-wrap; }}
</style></head><body>
<h1>Base model vs adapter</h1>
<ul><li>base model: <code>{esc(result["base_model"])}</code></li><li>adapter: <code>{esc(result["adapter"])}</code></li>
<li>held-out data: {esc(result["data"])} ({result["n"]} prompts, greedy)</li>{probe_line}</ul>
<table><tr><th>metric</th><th>base</th><th>adapter</th><th></th></tr>{table}</table>
<img alt="metrics" src="data:image/png;base64,{_bar_chart(result)}">
{_benchmarks_html(result.get("benchmarks"))}
{loss_img}
<h2>Side by side</h2>
<table><tr><th>prompt</th><th>reference</th><th>base</th><th>adapter</th></tr>{examples}</table>
</body></html>
"""


def _loss(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def runs_table(rows: list[dict[str, Any]]):
    """`llama-lora runs`: one line per run directory (run_status.list_runs) as a rich table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("run", "date (UTC)", "model", "data", "method", "eval loss", "tok/s", "status"):
        table.add_column(col, justify="right" if col == "tok/s" else "left", overflow="fold")
    for r in rows:
        evals = (
            "-" if r["eval_loss"] is None else f"{_loss(r['eval_loss_before'])} -> {_loss(r['eval_loss'])}"
        )
        tps = r["tokens_per_second"]
        cells = [
            r["run"],
            (r["date"] or "-")[:16].replace("T", " "),
            str(r["model"] or "-"),
            str(r["data"] or "-"),
            r["method"] or "-",
            evals,
            "-" if tps is None else f"{tps:.0f}",
            r["status"] + (f": {r['error']}" if r.get("error") else ""),
        ]
        table.add_row(*(Text(c) for c in cells))  # Text: paths are not rich markup
    return table
