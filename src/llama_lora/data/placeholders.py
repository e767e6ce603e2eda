"""`{{name}}` placeholders in rows (LLaMA-Factory's identity.json holds `{{name}}` and `{{author}}`): found,
counted, warned about when left unfilled, and filled from `data.fill` before tokenizing."""

from __future__ import annotations

import re
from typing import Any

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def placeholders(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Template placeholders such as `{{name}}` left in the rows: name -> number of rows holding it."""
    counts: dict[str, int] = {}
    for row in rows:
        for name in {m for s in _strings(row) for m in PLACEHOLDER.findall(s)}:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def fill_placeholders(row: Any, fill: dict[str, str]) -> Any:
    """`row` with every `{{name}}` named in `fill` replaced by its value (other placeholders kept)."""
    if not fill:
        return row
    if isinstance(row, str):
        return PLACEHOLDER.sub(lambda m: fill.get(m.group(1), m.group(0)), row)
    if isinstance(row, dict):
        return {k: fill_placeholders(v, fill) for k, v in row.items()}
    if isinstance(row, list):
        return [fill_placeholders(v, fill) for v in row]
    return row


def placeholder_warnings(rows: list[dict[str, Any]], fill: dict[str, str], where: str) -> list[str]:
    """Warnings for `{{name}}` placeholders that `data.fill` leaves in many rows (at least 2 and 5%),
    and for `data.fill` names that no row holds."""
    found = placeholders(rows)
    least = max(2, len(rows) // 20)
    left = {name: n for name, n in found.items() if name not in fill and n >= least}
    warnings = []
    if left:
        counts = ", ".join(f"{{{{{name}}}}} in {n} of {len(rows)} rows" for name, n in left.items())
        keys = " ".join(f"data.fill.{name}=..." for name in left)
        warnings.append(
            f"warning: {where}: placeholders left in the rows ({counts}) would be trained as written; "
            f"fill them with {keys}"
        )
    unused = [name for name in fill if name not in found]
    if unused:
        names = ", ".join(f"{{{{{name}}}}}" for name in unused)
        warnings.append(f"warning: data.fill: no row of {where} holds {names}")
    return warnings
