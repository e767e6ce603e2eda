"""The benchmarks `llama-lora eval` knows and lm-eval's task objects for them.

Each task is lm-eval's own stock YAML (prompts, choices, metrics, filters, few-shot settings), loaded untouched
but for its dataset: with a data directory the benchmark's original files (`lmeval_data.py`) replace the hub
dataset; without one, lm-eval downloads from the hub as usual. Running the tasks is `lmeval.py`'s part.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_lora.errors import LlamaLoraError
from llama_lora.evaluate import lmeval_data


class BenchmarkError(LlamaLoraError):
    pass


@dataclass(frozen=True)
class Spec:
    yaml: str  # lm-eval's stock task file, relative to lm_eval/tasks
    benchmark: str  # the local layout in lmeval_data.LAYOUT
    metric: str  # the metric the verdict is on (lm-eval's name, filter included where not "none")


TASKS: dict[str, Spec] = {
    "arc_easy": Spec("arc/arc_easy.yaml", "arc_easy", "acc_norm"),
    "arc_challenge": Spec("arc/arc_challenge.yaml", "arc_challenge", "acc_norm"),
    "piqa": Spec("piqa/piqa.yaml", "piqa", "acc_norm"),
    "winogrande": Spec("winogrande/default.yaml", "winogrande", "acc"),
    "hellaswag": Spec("hellaswag/hellaswag.yaml", "hellaswag", "acc_norm"),
    "truthfulqa_mc1": Spec("truthfulqa/truthfulqa_mc1.yaml", "truthfulqa", "acc"),
    "truthfulqa_mc2": Spec("truthfulqa/truthfulqa_mc2.yaml", "truthfulqa", "acc"),
    "gsm8k": Spec("gsm8k/gsm8k.yaml", "gsm8k", "exact_match,strict-match"),
    "mmlu": Spec("mmlu/default", "mmlu", "acc"),  # the group: 57 subjects, weighted by size
}


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def mmlu_subjects() -> list[str]:
    return sorted(p.stem.removeprefix("mmlu_") for p in (_tasks_dir() / "mmlu/default").glob("mmlu_*.yaml"))


def parse_tasks(text: str) -> list[str]:
    """`arc_easy,piqa` -> names, each one lm-eval task (or `mmlu`, or one `mmlu_<subject>`)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BenchmarkError("--tasks: give one or more task names, comma-separated")
    subjects = None
    for name in names:
        if name in TASKS:
            continue
        subjects = subjects if subjects is not None else mmlu_subjects()
        if name.startswith("mmlu_") and name.removeprefix("mmlu_") in subjects:
            continue
        raise BenchmarkError(
            f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)} and mmlu_<subject> (docs/benchmarks.md)"
        )
    return list(dict.fromkeys(names))


def spec_of(name: str) -> tuple[Spec, list[str | None]]:
    """The task's spec and the MMLU subjects it covers ([None] for other tasks)."""
    if name in TASKS:
        return TASKS[name], (mmlu_subjects() if name == "mmlu" else [None])
    return TASKS["mmlu"], [name.removeprefix("mmlu_")]


def check_data(names: list[str], data_dir: str | None) -> None:
    """A missing data directory or benchmark file: one line, before any model is loaded."""
    if data_dir is None:
        return
    root = Path(data_dir)
    if not root.is_dir():
        raise BenchmarkError(f"--data-dir {data_dir}: no such directory")
    for name in names:
        spec, subjects = spec_of(name)
        for subject in subjects:
            absent = lmeval_data.missing(spec.benchmark, root, subject)
            if absent is not None:
                raise BenchmarkError(
                    f"--data-dir {data_dir}: {name} needs {absent.relative_to(root)}, which is not there"
                )


def task_configs(name: str, data_dir: str | None) -> list[dict[str, Any]]:
    """lm-eval's stock config for `name` (one per MMLU subject), its dataset swapped for the local files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    spec, subjects = spec_of(name)
    configs = []
    for subject in subjects:
        path = _tasks_dir() / (f"{spec.yaml}/mmlu_{subject}.yaml" if subject else spec.yaml)
        cfg = load_yaml(path, resolve_func=True)
        cfg.pop("tag", None)
        if data_dir is not None:
            root = Path(data_dir).resolve()
            present = {s for s, p in lmeval_data.files(spec.benchmark, root, subject).items() if p.is_file()}
            cfg["custom_dataset"] = functools.partial(lmeval_data.load, spec.benchmark, str(root), subject)
            cfg["dataset_kwargs"] = None
            for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
                if cfg.get(key) is not None and cfg[key] not in present:
                    cfg[key] = None
        configs.append(cfg)
    return configs


def build_tasks(name: str, data_dir: str | None) -> list[Any]:
    """Task objects, data loaded (downloaded without a data directory): a failure is one line."""
    from lm_eval.api.task import ConfigurableTask

    try:
        return [ConfigurableTask(config=cfg) for cfg in task_configs(name, data_dir)]
    except LlamaLoraError:
        raise
    except Exception as exc:  # datasets' offline and not-found errors have no common base
        where = f"from {data_dir}" if data_dir else "from the Hugging Face hub (offline? pass --data-dir DIR)"
        raise BenchmarkError(
            f"{name}: its data could not be loaded {where}: {str(exc).splitlines()[0]}"
        ) from None
