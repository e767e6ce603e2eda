"""Standard benchmarks through lm-evaluation-harness: did fine-tuning cost the model its general skills?

`llama-lora eval` and `compare --benchmarks` run lm-eval's own task definitions (its YAML: prompts,
choices, metrics, filters, few-shot settings; built in `lmeval_tasks.py`) through its Python API on one
loaded model: the base side first, with the adapter unmerged and switched off, then the adapter side with the
adapter folded into the weights (as `loading.load` does for speed). With a data directory each task reads
the benchmark's original files (`lmeval_data.py`) in place of the hub dataset; that is the only change to
the task, so the scores are lm-eval's and compare with published lm-eval figures. Without one, lm-eval
downloads from the hub as usual.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from llama_lora.evaluate.lmeval_tasks import build_tasks, check_data, parse_tasks, spec_of
from llama_lora.progress import Bar

CHUNK = 256  # requests per call into lm-eval, so that the progress bar moves


def _chunks(requests: list[Any]) -> list[list[Any]]:
    """Runs of about CHUNK requests that never split one document's requests (lm-eval batches the
    choices of one context together)."""
    out, current = [], []
    for req in requests:
        if len(current) >= CHUNK and (req.task_name, req.doc_id) != (
            current[-1].task_name,
            current[-1].doc_id,
        ):
            out.append(current)
            current = []
        current.append(req)
    return out + ([current] if current else [])


def make_lm(model: Any, tokenizer: Any, batch_size: int, bar: Bar):
    from lm_eval.models.huggingface import HFLM

    class CountedLM(HFLM):
        def _in_chunks(self, method, requests):
            bar.add_total(len(requests))
            results = []
            for chunk in _chunks(requests):
                results += method(chunk, disable_tqdm=True)
                bar.advance(len(chunk))
            return results

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._in_chunks(super().loglikelihood, requests)

        def generate_until(self, requests, disable_tqdm=False):
            return self._in_chunks(super().generate_until, requests)

    return CountedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _metrics(task_result: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    values, stderrs = {}, {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        if metric.endswith("_stderr"):
            stderrs[name.replace("_stderr", "", 1)] = float(value)
        else:
            values[name] = float(value)
    return values, stderrs


def _aggregate(parts: list[tuple[dict, dict, int]]) -> tuple[dict[str, float], dict[str, float]]:
    """MMLU's subjects -> the group's figure, as lm-eval aggregates it (weighted by size, pooled stderr)."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    sizes = [n for _, _, n in parts]
    values, stderrs = {}, {}
    for metric in parts[0][0]:
        values[metric] = aggregate_subtask_metrics([v[metric] for v, _, _ in parts], sizes)
        if all(metric in s for _, s, _ in parts) and sum(sizes) > len(sizes):
            stderrs[metric] = pooled_sample_stderr([s[metric] for _, s, _ in parts], sizes)
    return values, stderrs


def evaluate_side(lm, names: list[str], data_dir: str | None, limit: int | None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)
    out = {}
    for name in names:
        tasks = build_tasks(name, data_dir)
        start = time.perf_counter()
        result = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, verbosity=None
        )
        seconds = time.perf_counter() - start
        parts = []
        for task in tasks:
            task_name = task.config.task
            values, stderrs = _metrics(result["results"][task_name])
            parts.append((values, stderrs, int(result["n-samples"][task_name]["effective"])))
        values, stderrs = parts[0][:2] if len(parts) == 1 else _aggregate(parts)
        rows = sum(n for _, _, n in parts)
        out[name] = {
            "values": values,
            "stderr": stderrs,
            "rows": rows,
            "num_fewshot": result["configs"][tasks[0].config.task].get("num_fewshot") or 0,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
        }
    return out


def verdicts(names: list[str], base: dict[str, Any], adapter: dict[str, Any]) -> dict[str, Any]:
    """Per task: the verdict metric, base and adapter value, the delta and whether it exceeds 2 stderr
    (the stderr of a difference of the two estimates, sqrt(se_base^2 + se_adapter^2))."""
    out = {}
    for name in names:
        metric = spec_of(name)[0].metric
        b, a = base[name], adapter[name]
        delta = a["values"][metric] - b["values"][metric]
        se = math.sqrt(b["stderr"].get(metric, 0.0) ** 2 + a["stderr"].get(metric, 0.0) ** 2)
        significant = abs(delta) > 2 * se
        out[name] = {
            "metric": metric,
            "base": b["values"][metric],
            "adapter": a["values"][metric],
            "base_stderr": b["stderr"].get(metric),
            "adapter_stderr": a["stderr"].get(metric),
            "delta": delta,
            "delta_stderr": se,
            "drop_exceeds_2_stderr": significant and delta < 0,
            "verdict": ("lost" if delta < 0 else "gained") if significant else "kept",
        }
    return out


def quiet_lm_eval(verbose: bool) -> None:
    if not verbose:
        for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def eval_dtype(device: str, precision: str):
    """`auto`: bf16 where the device computes it natively (the dtype SmolLM2 and Llama 3.2 ship in, and
    what lm-eval's `dtype=auto` gives on a GPU), else float32."""
    import torch

    from llama_lora.model import hardware

    if precision == "auto":
        precision = hardware.resolve_precision(device, "auto")
        precision = "bf16" if precision == "bf16" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def run_loaded(
    loaded: Any,
    names: list[str],
    data_dir: str | None,
    limit: int | None = None,
    batch_size: int = 16,
    precision: str = "auto",
    quiet: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Both sides on `loaded` (loading.load's result, float32). With an adapter: the base side first
    (adapter unmerged and switched off), then the adapter side (merged in float32, then cast); without one,
    the model alone as side "model". The model is left in the evaluation dtype."""
    import torch

    quiet_lm_eval(verbose)
    for name in names:  # data problems surface before the first forward pass
        build_tasks(name, data_dir)
    start = time.perf_counter()
    dtype = eval_dtype(loaded.device, precision)
    model = loaded.model
    has_adapter = loaded.source is not None
    inner = model.get_base_model() if has_adapter else model
    sides: dict[str, Any] = {}

    def side(label: str) -> None:
        # requests done of requests asked; without a terminal, a plain line a minute
        with Bar(f"{label:<7}", unit="requests", lines=True, quiet=quiet) as bar:
            lm = make_lm(inner, loaded.tokenizer, batch_size, bar)
            sides[label] = evaluate_side(lm, names, data_dir, limit)

    if has_adapter:
        model.unmerge_adapter()  # a no-op when nothing is merged
        model.to(dtype)
        with model.disable_adapter():
            side("base")
        model.to(torch.float32)
        model.merge_adapter()
        model.to(dtype)
        side("adapter")
    else:
        model.to(dtype)
        side("model")
    result = {
        "model": loaded.description,
        "tasks": names,
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "limit": limit,
        "batch_size": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "lm_eval_version": _version(),
        "sides": sides,
        "runtime_s": round(time.perf_counter() - start, 2),
    }
    if has_adapter:
        result["comparison"] = verdicts(names, sides["base"], sides["adapter"])
    return result


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """(task, metric, base, adapter, delta, verdict) strings, or (task, metric, value) without an adapter."""
    rows = []
    for name in result["tasks"]:
        metric = spec_of(name)[0].metric
        if "comparison" in result:
            c = result["comparison"][name]
            rows.append(
                (
                    name,
                    metric,
                    _pm(c["base"], c["base_stderr"]),
                    _pm(c["adapter"], c["adapter_stderr"]),
                    f"{c['delta']:+.4f}",
                    c["verdict"],
                )
            )
        else:
            side = result["sides"]["model"][name]
            rows.append((name, metric, _pm(side["values"][metric], side["stderr"].get(metric))))
    return rows


def _pm(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def evaluate(
    target: str,
    tasks: str,
    limit: int | None = None,
    data_dir: str | None = None,
    batch_size: int = 16,
    precision: str = "auto",
    json_out: str | None = None,
    device: str = "auto",
    verbose: bool = False,
    log=print,
) -> dict[str, Any]:
    """`llama-lora eval`: a run or adapter directory (base vs base + adapter, eval.json in the run) or a
    model (merged or plain, evaluated alone; written only with `json_out`)."""
    from llama_lora import run_dir
    from llama_lora.infer import loading

    names = parse_tasks(tasks)
    check_data(names, data_dir)
    is_adapter = run_dir.adapter_dir_of(target) is not None
    if is_adapter:  # unmerged: the base side then runs on the base weights exactly
        loaded = loading.load(adapter=target, device=device, merge_in_memory=False, log=log)
    else:
        loaded = loading.load(base=target, device=device, log=log)
    log(f"evaluating {loaded.description} on {', '.join(names)}" + (f" ({limit} rows each)" if limit else ""))
    result = run_loaded(loaded, names, data_dir, limit, batch_size, precision, verbose=verbose)
    if json_out:
        out = Path(json_out)
    elif is_adapter and loaded.source is not None:
        out = (loaded.source.run_dir or loaded.source.adapter_dir) / "eval.json"
    else:
        out = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        run_dir.write_json(out, result)
        result["file"] = str(out)
    return result
