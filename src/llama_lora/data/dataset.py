"""A config's data as training uses it: the tokenized training and held-out examples (SFT examples,
preference pairs, KTO examples or GRPO's prompts), with the template chosen and notes for the log (what was cut, dropped or left unfilled).
`train/build.py` and `data inspect` (inspection.py) both load through `load_dataset`, so they never differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from llama_lora.config import Config
from llama_lora.data import encoding, kto, pairs, placeholders, prompts, sources, templates
from llama_lora.errors import DataError


@dataclass
class Dataset:
    train: list[encoding.Example]
    eval: list[encoding.Example]
    template: str
    train_rows: int
    eval_rows: int
    notes: list[str]
    skipped_rows: int = 0  # rows without required fields, skipped with data.skip_bad_rows
    train_stats: encoding.PrepareStats | None = None  # what was cut or dropped (shown by `data inspect`)
    eval_stats: encoding.PrepareStats | None = None


def load_dataset(cfg: Config, tokenizer, rows: tuple[list[dict], list[dict]] | None = None) -> Dataset:
    """Tokenized training and held-out examples; `rows` = what split_rows(cfg) returns, when already loaded."""
    template = templates.choose_template(tokenizer, cfg.data.template)
    train_rows, eval_rows = rows if rows is not None else sources.split_rows(cfg.data, cfg.train.seed)
    if not train_rows:
        raise DataError(f"{cfg.data.source}: no rows in split {cfg.data.split!r}")
    prepare = {
        "sft": encoding.prepare,
        "kto": functools.partial(kto.prepare_kto, block=cfg.train.batch_size),
        "grpo": prompts.prepare_prompts,
    }.get(cfg.train.objective, pairs.prepare_pairs)
    train_ex, tstats = prepare(train_rows, tokenizer, cfg.data, template, where=cfg.data.source)
    eval_ex, estats = prepare(eval_rows, tokenizer, cfg.data, template, where=f"{cfg.data.source} (eval)")
    if not train_ex:
        why = (
            "raise data.max_length, or set data.truncation: truncate"
            if tstats.dropped_too_long
            else "every label would be masked (no row has a response token left to train), so nothing could be learned"
        )
        raise DataError(
            f"{cfg.data.source}: no training rows left after filtering ({tstats.summary()}); {why}"
        )
    notes = [f"train data: {tstats.summary()}"]
    if eval_rows:
        notes.append(f"eval data: {estats.summary()}")
    notes += placeholders.placeholder_warnings(train_rows + eval_rows, cfg.data.fill, cfg.data.source)
    skipped = len(tstats.bad_rows) + len(estats.bad_rows)
    return Dataset(
        train_ex, eval_ex, template, len(train_rows), len(eval_rows), notes, skipped, tstats, estats
    )
