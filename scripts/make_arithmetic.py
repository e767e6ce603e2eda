"""Write the bundled arithmetic word problems (src/llama_lora/demo_data/arithmetic/{train,eval}.jsonl) for
GRPO: short problems with whole-number answers, the rows `prompt` and `answer`, from a fixed seed, so that
running this again gives the same files byte for byte (tests/data/test_arithmetic_data.py checks it).

The problems are one addition, subtraction or multiplication with small numbers (sums and differences within
40, products of 2-5 by 2-5): sized to the embedded SmolLM2-135M-Instruct, which answers about a third of them
greedily before training and often gets one right among 8 samples, the spread GRPO learns from. Division and
two-step problems with larger numbers were tried first: the model answered 4 of 100 and rarely sampled a right
answer, so its groups had nothing to compare (bench/RESULTS.md, session 16 and 17).

    python scripts/make_arithmetic.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "llama_lora" / "demo_data" / "arithmetic"
SEED = 31
SIZES = {"train": 600, "eval": 100}
INSTRUCTION = "Solve the problem. End your reply with a line of the form 'Answer: <number>'."
NAMES = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kofi",
    "Lena",
    "Mia",
    "Noor",
]
ITEMS = ["apples", "books", "coins", "stickers", "pencils", "shells", "marbles", "cards", "cookies", "stamps"]


def _problem(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?", a - b
    a, b = rng.randint(2, 5), rng.randint(2, 5)  # "mul"
    return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b


def rows(n: int, rng: random.Random, seen: set[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    while len(out) < n:
        text, answer = _problem(rng)
        if text in seen:  # no problem twice, and none shared by the two splits
            continue
        seen.add(text)
        out.append({"prompt": f"{text}\n{INSTRUCTION}", "answer": str(answer)})
    return out


def main(out: Path = OUT) -> None:
    rng, seen = random.Random(SEED), set()
    out.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(n, rng, seen))
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
