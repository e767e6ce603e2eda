"""Write the bundled arithmetic word problems (src/llama_lora/demo_data/arithmetic/{train,eval}.jsonl) for
GRPO: short problems with whole-number answers, the rows `prompt` and `answer`, from a fixed seed, so that
running this again gives the same files byte for byte (tests/data/test_arithmetic_data.py checks it).

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
    kind = rng.choice(["add", "sub", "mul", "div", "two_step"])
    if kind == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?", a - b
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b
    if kind == "div":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (
            f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?",
            a,
        )
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} has {a} {item}, buys {b} more and then gives {c} away. How many {item} does {name} have?",
        a + b - c,
    )


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
