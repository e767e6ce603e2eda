"""Where rows come from: a local file (.json/.jsonl/.txt/.csv/.parquet), a directory of `<split>.<ext>`
files, a hub dataset with a split expression (`train[:1%]`), or the bundled `demo` / `demo-pairs`; the
train/eval split, and the dataset's probe for `compare`.

The rest of the data chain is a set of plain functions, each testable on three-line inputs:

    row --formats.to_messages--> messages --templates.render_segments--> [(text, trainable)]
        --encoding.tokenize--> ids + labels
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

from llama_lora.data import formats
from llama_lora.errors import DataError, LlamaLoraError

LOCAL_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
}


BUNDLED = {
    "demo": "",
    "demo-pairs": "pairs",
    "demo-arithmetic": "arithmetic",
}  # data.source aliases -> folders of demo_data/


def bundled_dir(source: str = "demo") -> Path:
    return Path(str(resources.files("llama_lora") / "demo_data" / BUNDLED[source]))


def source_path(source: str) -> Path:
    return bundled_dir(source) if source in BUNDLED else Path(source).expanduser()


def _local_files(path: Path, split: str) -> dict[str, str]:
    """data_files for the split named by `split` (`train[:10%]` names `train`). A directory holds one file
    per split (`train.jsonl`, `eval.jsonl`, ...); a single file is the split `train`."""
    name = re.match(r"[\w.-]*", split).group(0)  # type: ignore[union-attr]
    if path.is_dir():
        files = {
            p.stem: str(p)
            for p in sorted(path.iterdir())
            if p.suffix in LOCAL_EXTENSIONS and p.name != "probe.json"
        }
        if name not in files:
            raise DataError(
                f"data.split: {path} has no split {name!r} (it has: {', '.join(files) or 'none'})"
            )
        return {name: files[name]}
    return {"train": str(path)}


def _builder(files: dict[str, str]) -> str:
    for f in files.values():
        if Path(f).suffix not in LOCAL_EXTENSIONS:
            raise DataError(
                f"data.source: {f}: cannot read {Path(f).suffix or 'extension-less'} files "
                f"(use {', '.join(LOCAL_EXTENSIONS)} or a hub dataset id)"
            )
    kinds = {LOCAL_EXTENSIONS[Path(f).suffix] for f in files.values()}
    if len(kinds) != 1:
        raise DataError(f"data.source: mixed file types {sorted(kinds)} in one source")
    return kinds.pop()


def _records(value: Any, path: Path) -> list[Any]:
    """The rows a parsed .json file holds: a list of records, one record, or an object holding exactly one
    list of records (`{"version": 1, "data": [...]}`)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        try:
            formats.detect_format(value)
            return [value]
        except DataError:
            pass
        lists = [
            v for v in value.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
        ]
        if len(lists) == 1:
            return lists[0]
        raise DataError(
            f"{path}: the top-level JSON object is neither a record nor holds exactly one list of records "
            f"(keys: {', '.join(map(str, value)) or 'none'})"
        )
    raise DataError(f"{path}: expected records (a JSON list or object), found a JSON {type(value).__name__}")


def _read_local(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json, .jsonl or .txt file, read here rather than by `datasets` so that a UTF-8 BOM, CRLF
    line ends, a top-level object, rows with differing fields and a malformed line (named) are all handled.
    A .txt file is a document a line; blank lines are skipped."""
    text = path.read_bytes().decode("utf-8-sig")
    if not text.strip():
        raise DataError(f"data.source: {path} is empty (no rows)")
    if path.suffix == ".txt":
        return [{"text": line.removesuffix("\r")} for line in text.split("\n") if line.strip()]
    rows: list[Any] | None = None
    if path.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            rows = _records(json.loads(text), path)
        except json.JSONDecodeError as exc:
            if not (text.lstrip().startswith("{") and exc.msg == "Extra data"):  # else: JSON lines
                raise DataError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if rows is None:
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in a string
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: malformed JSON at line {number}: {exc.msg}") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index} is a JSON {type(row).__name__}, not an object of fields")
    return rows


def _take_split(rows: list[dict[str, Any]], name: str, split: str) -> list[dict[str, Any]]:
    """`train[:10%]`, `train[5:20]+train[-5:]`: the same split expressions (and rounding) as `datasets`."""
    import datasets

    spans = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(rows)})
    return [row for span in spans for row in rows[span.from_ : span.to]]


def load_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of `source` for a split expression such as `train`, `train[:1%]` or `eval`.

    Local .json/.jsonl/.txt files are read by `_read_local`; .csv, .parquet and hub datasets by `datasets`.
    Every failure is a DataError naming the source (and the line or row where known)."""
    import datasets

    datasets.disable_progress_bars()
    path = source_path(source)
    local = source in BUNDLED or path.exists() or path.suffix in LOCAL_EXTENSIONS
    try:
        if local:
            if not path.exists():
                raise DataError(f"data.source: file {source} not found")
            files = _local_files(path, split)
            for f in files.values():
                if Path(f).stat().st_size == 0:
                    raise DataError(f"data.source: {f} is empty (no rows)")
            builder = _builder(files)
            if builder in ("json", "text"):
                name, f = next(iter(files.items()))
                return _take_split(_read_local(Path(f)), name, split)
            extra = {"encoding": "utf-8-sig"} if builder == "csv" else {}  # a BOM is not a column name
            ds = datasets.load_dataset(builder, data_files=files, split=split, **extra)
        else:
            from llama_lora import hub

            if not hub.offline_mode():
                hub.require_hub(source, "dataset")
            try:
                ds = datasets.load_dataset(source, split=split)
            except (ConnectionError, OSError) as exc:
                raise hub.explain(exc, source, "dataset") from None
        return [dict(r) for r in ds]
    except LlamaLoraError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DataError(f"data.source: cannot read {source} ({reason})") from None
    except ValueError as exc:
        msg = str(exc).splitlines()[0]
        raise DataError(f"data.split: cannot take split {split!r} of {source}: {msg}") from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = str(exc.__cause__ or exc).splitlines()[0]
        raise DataError(f"{source}: could not read the rows ({cause})") from None
    except Exception as exc:  # anything else still becomes one line, never a traceback
        raise DataError(f"{source}: could not read the rows ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def split_rows(dcfg, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and held-out rows, from `eval_split` or a seeded `eval_fraction` of the source."""
    rows = load_rows(dcfg.source, dcfg.split)
    if dcfg.eval_split:
        held = load_rows(dcfg.source, dcfg.eval_split)
    elif dcfg.eval_fraction > 0 and len(rows) > 1:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * dcfg.eval_fraction))
        held = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    else:
        held = []
    if dcfg.max_rows is not None:
        rows = rows[: dcfg.max_rows]
    return rows, held


def load_probe(source: str) -> dict[str, Any] | None:
    """The behaviour probe a dataset directory declares in `probe.json` (None when it has none)."""
    path = source_path(source)
    probe = path / "probe.json" if path.is_dir() else path.with_name("probe.json")
    return json.loads(probe.read_text()) if probe.is_file() else None
