"""The bundled arithmetic problems (GRPO's demo data) are exactly what scripts/make_arithmetic.py writes, and
every answer is right: the problems are re-solved here from their text."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src" / "llama_lora" / "demo_data" / "arithmetic"


def _script():
    spec = importlib.util.spec_from_file_location("make_arithmetic", ROOT / "scripts" / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundled_files_are_what_the_script_writes(tmp_path):
    _script().main(tmp_path)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes(), split


def _solve(text: str) -> int:
    n = [int(x) for x in re.findall(r"\d+", text.split("\n")[0])]
    if "gets" in text and "more" in text:
        return n[0] + n[1]
    if "gave" in text:
        return n[0] - n[1]
    assert "in each box" in text, text
    return n[0] * n[1]


def test_every_answer_is_right_and_no_problem_is_in_both_splits():
    splits = {s: [json.loads(line) for line in (DATA / f"{s}.jsonl").open()] for s in ("train", "eval")}
    assert (len(splits["train"]), len(splits["eval"])) == (600, 100)
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"prompt", "answer"} and int(row["answer"]) == _solve(row["prompt"]), row
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["eval"]}
