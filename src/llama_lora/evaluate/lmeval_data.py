"""Benchmark files as their authors publish them -> the rows lm-eval's tasks expect from the hub.

`llama-lora eval --data-dir DIR` runs lm-evaluation-harness's own task definitions (templates, metrics,
filters) with one change: the dataset comes from these loaders instead of the Hugging Face hub. Each loader
reads the original files under DIR (the layout of `../shared/data/benchmarks/`, docs/benchmarks.md) and
returns a `datasets.DatasetDict` with the hub dataset's split names and fields, as the hub's own loader
builds them: ARC's nested question flattened, PIQA's labels joined from their own file, MMLU's headerless
CSV read with the `csv` module (so "None" and "4" stay strings), TruthfulQA's answer dicts turned into
choice and label lists. Nothing else is changed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llama_lora.errors import LlamaLoraError


class BenchmarkDataError(LlamaLoraError):
    pass


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _arc(path: Path) -> list[dict[str, Any]]:
    return [
        {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in row["question"]["choices"]],
                "label": [c["label"] for c in row["question"]["choices"]],
            },
            "answerKey": row["answerKey"],
        }
        for row in _jsonl(path)
    ]


def _piqa(path: Path) -> list[dict[str, Any]]:
    rows = _jsonl(path)
    labels = path.with_name(path.stem + "-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise BenchmarkDataError(f"{path}: {len(rows)} rows but {len(labels)} labels in its -labels.lst")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(x)}
        for r, x in zip(rows, labels)
    ]


def _winogrande(path: Path) -> list[dict[str, Any]]:
    keys = ("sentence", "option1", "option2", "answer")
    return [{k: row[k] for k in keys} for row in _jsonl(path)]


def _mmlu(path: Path) -> list[dict[str, Any]]:
    subject = path.stem.rsplit("_", 1)[0]
    with path.open(encoding="utf-8", newline="") as fh:
        return [
            {"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
            for r in csv.reader(fh)
        ]


def _truthfulqa(path: Path) -> list[dict[str, Any]]:
    def targets(answers: dict[str, int]) -> dict[str, list]:
        return {"choices": list(answers), "labels": list(answers.values())}

    rows = json.loads(path.read_text(encoding="utf-8"))
    return [
        {
            "question": r["question"],
            "mc1_targets": targets(r["mc1_targets"]),
            "mc2_targets": targets(r["mc2_targets"]),
        }
        for r in rows
    ]


def _hellaswag(path: Path) -> list[dict[str, Any]]:
    rows = _jsonl(path)
    for row in rows:
        row["label"] = str(row["label"])  # a string on the hub; lm-eval's process_docs applies int()
    return rows


def _plain(path: Path) -> list[dict[str, Any]]:
    return _jsonl(path)


# benchmark -> (reader, {hub split: file under DIR}); the first split listed is the one evaluated
LAYOUT: dict[str, tuple[Any, dict[str, str]]] = {
    "arc_easy": (
        _arc,
        {
            "test": "arc_easy/ARC-Easy-Test.jsonl",
            "train": "arc_easy/ARC-Easy-Train.jsonl",
            "validation": "arc_easy/ARC-Easy-Dev.jsonl",
        },
    ),
    "arc_challenge": (
        _arc,
        {
            "test": "arc_challenge/ARC-Challenge-Test.jsonl",
            "train": "arc_challenge/ARC-Challenge-Train.jsonl",
            "validation": "arc_challenge/ARC-Challenge-Dev.jsonl",
        },
    ),
    "piqa": (_piqa, {"validation": "piqa/valid.jsonl"}),
    "winogrande": (_winogrande, {"validation": "winogrande/dev.jsonl"}),
    "hellaswag": (_hellaswag, {"validation": "hellaswag/hellaswag_val.jsonl"}),
    "truthfulqa": (_truthfulqa, {"validation": "truthfulqa/data/v0/mc_task.json"}),
    "gsm8k": (_plain, {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}),
    "mmlu": (_mmlu, {"test": "mmlu/test/{subject}_test.csv", "dev": "mmlu/dev/{subject}_dev.csv"}),
}


def files(benchmark: str, data_dir: Path, subject: str | None = None) -> dict[str, Path]:
    _, layout = LAYOUT[benchmark]
    return {split: data_dir / rel.format(subject=subject) for split, rel in layout.items()}


def missing(benchmark: str, data_dir: Path, subject: str | None = None) -> Path | None:
    """The evaluated split's file when it is absent (other splits are optional: few-shot pools)."""
    first = next(iter(files(benchmark, data_dir, subject).values()))
    return None if first.is_file() else first


def load(benchmark: str, data_dir: str, subject: str | None = None, **_lm_eval_metadata: Any):
    """The `custom_dataset` of a local task: lm-eval calls it with the task's metadata as keywords."""
    import datasets

    reader, _ = LAYOUT[benchmark]
    splits = {}
    for split, path in files(benchmark, Path(data_dir), subject).items():
        if path.is_file():
            splits[split] = datasets.Dataset.from_list(reader(path))
    return datasets.DatasetDict(splits)
