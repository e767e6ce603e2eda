"""ARCHITECTURE.md stays true to src/llama_lora/, and measurements stay in bench/RESULTS.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "llama_lora"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"

# A table row whose first cell is a module: "| `train.py` | ..."
TABLE_MODULE = re.compile(r"^\|\s*`(\w+)\.py`\s*\|", re.MULTILINE)
# Any bare module name in the text: `build.py`, not `bench/paired_steps.py` or `tests/test_data.py`
NAMED_MODULE = re.compile(r"(?<![\w/.-])(\w+)\.py\b")

# Dated figures: an ISO date (2026-11-28), a month and year (November 2026), or a work session ("session 4",
# "sessions 4-5"). Measurements carry their date and machine in bench/RESULTS.md and nowhere else.
DATED = re.compile(
    r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"
    r"|\b(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.? (?:19|20)\d\d\b"
    r"|\bsessions? \d",
    re.IGNORECASE,
)


def package_modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def test_architecture_names_every_module_in_its_tables():
    """Every module in src/llama_lora/ has a row in ARCHITECTURE.md, and every row is a module that exists."""
    rows = TABLE_MODULE.findall(ARCHITECTURE.read_text())
    doubled = sorted({m for m in rows if rows.count(m) > 1})
    assert not doubled, f"modules with more than one row in ARCHITECTURE.md: {doubled}"
    missing = sorted(package_modules() - set(rows))
    assert not missing, f"modules in src/llama_lora/ without a row in ARCHITECTURE.md: {missing}"
    stale = sorted(set(rows) - package_modules())
    assert not stale, f"ARCHITECTURE.md has rows for modules that do not exist: {stale}"


def test_architecture_names_only_modules_that_exist():
    """A module named anywhere in ARCHITECTURE.md (prose and diagram too) is a file in src/llama_lora/."""
    named = set(NAMED_MODULE.findall(ARCHITECTURE.read_text()))
    unknown = sorted(m for m in named if not (PACKAGE / f"{m}.py").is_file())
    assert not unknown, f"ARCHITECTURE.md names modules that do not exist: {unknown}"


def test_readme_points_to_architecture():
    assert "ARCHITECTURE.md" in (ROOT / "README.md").read_text()


def checked_files() -> list[Path]:
    """Code and docs that must not carry dated figures: the code and Markdown of src/, docs/, bench/*.py and
    the top-level Markdown files (not the demo data: its rows may well mention dates). bench/RESULTS.md is
    where those figures live."""
    files = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "src").rglob("*.md"))
    files += sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "bench").glob("*.py"))
    files += sorted(ROOT.glob("*.md"))
    return [p for p in files if p.name != "RESULTS.md" and "__pycache__" not in p.parts]


def test_dated_pattern_catches_what_it_is_for():
    assert DATED.search("Run on one NVIDIA H200, 2026-11-28, 8 steps")
    assert DATED.search("peak RSS 2.62 GB (session 4)")
    assert DATED.search("same machine as sessions 4-5")
    assert DATED.search("measured in November 2026")
    for fine in ("study sessions", "train[:10%]", "lr 2e-5", "torch 2.13.0", "decoder 2048 wide", "r=16"):
        assert not DATED.search(fine), fine


def test_no_dated_figures_outside_results():
    files = checked_files()
    assert any(p.name == "fused.md" for p in files) and any(p.name == "train.py" for p in files)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = DATED.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, "dated figures belong in bench/RESULTS.md (leave a pointer):\n" + "\n".join(found)
