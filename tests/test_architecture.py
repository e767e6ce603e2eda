"""ARCHITECTURE.md stays true to src/llama_lora/ (tables, dependency direction, no cycles, sizes), and
measurements stay in bench/RESULTS.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "llama_lora"
ARCHITECTURE = ROOT / "ARCHITECTURE.md"

# A table row whose first cell is a module: "| `train/loop.py` | ..." (paths relative to src/llama_lora/)
TABLE_MODULE = re.compile(r"^\|\s*`((?:\w+/)*\w+\.py)`\s*\|", re.MULTILINE)
# Any module path in the text: `train/build.py`, `config.py`, `tests/train/test_dpo.py`, `bench/paired_steps.py`
NAMED_MODULE = re.compile(r"(?<![\w/.-])((?:[\w.]+/)*\w+\.py)\b")
OUTSIDE_PACKAGE = ("tests/", "bench/", "docs/", ".ci/", "src/")
# "**Dependency direction** (checked): core < model < data < ..."
DIRECTION = re.compile(r"\*\*Dependency direction\*\* \(checked\): ([\w <]+)")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60

# Dated figures: an ISO date (2026-11-28), a month and year (November 2026), or a work session ("session 4",
# "sessions 4-5"). Measurements carry their date and machine in bench/RESULTS.md and nowhere else.
DATED = re.compile(
    r"\b(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"
    r"|\b(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?"
    r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.? (?:19|20)\d\d\b"
    r"|\bsessions? \d",
    re.IGNORECASE,
)


def module_files() -> dict[str, Path]:
    """Every module of the package by its path under src/llama_lora/ (`train/loop.py`); an empty
    `__init__.py` (a folder marker) and `__main__.py` (`python -m llama_lora`) are not modules to describe."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        if path.name == "__init__.py" and not path.read_text().strip():
            continue
        found[path.relative_to(PACKAGE).as_posix()] = path
    return found


def dotted(relative: str) -> str:
    """`train/loop.py` -> `llama_lora.train.loop`; `cli/__init__.py` -> `llama_lora.cli`."""
    parts = ["llama_lora", *relative[: -len(".py")].split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, typing_only: bool = True) -> set[str]:
    """The llama_lora modules `path` imports, at the top or inside functions (`from llama_lora.x import y`
    counts as `llama_lora.x.y` when that is a module, else `llama_lora.x`); without `typing_only`, not the
    ones under `if TYPE_CHECKING:` (annotations only: never imported when the program runs)."""
    modules = {dotted(rel) for rel in module_files()} | {
        ".".join(("llama_lora", *p.relative_to(PACKAGE).parts[:-1])) for p in PACKAGE.rglob("__init__.py")
    }
    tree = ast.parse(path.read_text())
    skipped = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llama_lora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama_lora"):
            for a in node.names:
                candidate = f"{node.module}.{a.name}"
                found.add(candidate if candidate in modules else node.module)
    return found


def stage_of(module: str) -> str:
    """`llama_lora.train.loop` -> `train`; a top-level module -> `core`; the CLI -> `cli`."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "cli":
        return "cli" if len(parts) > 1 else "core"
    subpackage = (PACKAGE / parts[1]).is_dir()
    return parts[1] if subpackage else "core"


def test_architecture_names_every_module_in_its_tables():
    """Every module under src/llama_lora/ has a row in ARCHITECTURE.md, and every row is a module that exists."""
    rows = TABLE_MODULE.findall(ARCHITECTURE.read_text())
    doubled = sorted({m for m in rows if rows.count(m) > 1})
    assert not doubled, f"modules with more than one row in ARCHITECTURE.md: {doubled}"
    missing = sorted(set(module_files()) - set(rows))
    assert not missing, f"modules in src/llama_lora/ without a row in ARCHITECTURE.md: {missing}"
    stale = sorted(set(rows) - set(module_files()))
    assert not stale, f"ARCHITECTURE.md has rows for modules that do not exist: {stale}"


def test_architecture_names_only_modules_that_exist():
    """A module named anywhere in ARCHITECTURE.md (prose and diagram too) exists: a path under src/llama_lora/,
    or a bare name that is exactly one module's file name; paths under tests/, bench/, docs/ exist too."""
    names = {Path(rel).name for rel in module_files()}
    bare = [Path(rel).name for rel in module_files()]
    unknown = []
    for named in set(NAMED_MODULE.findall(ARCHITECTURE.read_text())):
        if named.startswith(OUTSIDE_PACKAGE):
            ok = (ROOT / named).is_file()
        else:  # a path under src/llama_lora/, or a bare file name that only one module has
            ok = named in module_files() or ("/" not in named and named in names and bare.count(named) == 1)
        if not ok:
            unknown.append(named)
    assert not unknown, (
        f"ARCHITECTURE.md names modules that do not exist (or are ambiguous): {sorted(unknown)}"
    )


def test_no_module_imports_a_later_stage():
    """The dependency direction ARCHITECTURE.md states holds for every import, lazy ones included."""
    order = [s.strip() for s in DIRECTION.search(ARCHITECTURE.read_text()).group(1).split("<")]
    assert order[0] == "core" and {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "cli"
    } >= set(order[1:]) - {"__pycache__"}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"cli"}
    assert folders <= set(order), f"folders missing from the stated direction: {sorted(folders - set(order))}"
    wrong = []
    for rel, path in module_files().items():
        here = stage_of(dotted(rel))
        if here == "cli":
            continue
        for target in imports_of(path):
            there = stage_of(target)
            if there == "cli" or order.index(there) > order.index(here):
                wrong.append(f"{rel} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the dependency direction:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    """No modules import each other in a cycle when the program runs, counting imports inside functions
    (a package's own __init__ is not an edge: importing a submodule always runs it; an annotation-only import
    under `if TYPE_CHECKING:` is not one either)."""
    graph = {dotted(rel): imports_of(path, typing_only=False) for rel, path in module_files().items()}
    for module, targets in graph.items():
        graph[module] = {t for t in targets if t in graph and t != module and not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_and_functions_stay_small():
    """STYLE.md's sizes: a module under 400 lines, a function within a screen (60 lines, its body and
    docstring included; a nested function counts inside its parent too)."""
    too_long = []
    for rel, path in module_files().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}: {node.name}() {length} lines")
    assert not too_long, "over STYLE.md's sizes:\n" + "\n".join(too_long)


def test_tests_mirror_the_folders():
    """tests/<folder>/ for every stage folder, end-to-end runs in tests/e2e/."""
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - {"cli"}
    tests = ROOT / "tests"
    missing = sorted(f for f in folders | {"e2e"} if not list((tests / f).glob("test_*.py")))
    assert not missing, f"stage folders without tests/<folder>/test_*.py: {missing}"


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
    assert any(p.name == "fused.md" for p in files) and any(p.name == "loop.py" for p in files)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = DATED.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not found, "dated figures belong in bench/RESULTS.md (leave a pointer):\n" + "\n".join(found)
