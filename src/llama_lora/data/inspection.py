"""`llama-lora data inspect`: the examples `train` would train on, before any training.

The data is loaded by `sources.split_rows` and `dataset.load_dataset` themselves (same config, template,
masking, truncation), with the tokenizer loaded as `train` loads it; this module only looks at the result:

    example --sides--> [(side, tokens)] --segments--> [(text, trained)]    counts(...)    split_warnings(...)

Under a preference objective an example is more than one tokenized sequence (a pair's chosen and rejected
sides, `sides()`); each side is shown, counted and checked like an SFT example, named by its side. A token
counts as trained when its label is not -100 and it is not the first token (the loss predicts token i from
the tokens before it, so the first one is never a target). Nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llama_lora.config import Config
from llama_lora.data import encoding, placeholders, sources, templates

MARK_OPEN, MARK_CLOSE = "\u00ab", "\u00bb"  # « »: trained text where there is no colour


def _trained_flags(example: encoding.Example) -> list[bool]:
    return [i > 0 and label != encoding.IGNORE for i, label in enumerate(example.labels)]


def _trained_ids(example: encoding.Example) -> list[int]:
    return [t for t, trained in zip(example.input_ids, _trained_flags(example), strict=True) if trained]


def trained_tokens(example: encoding.Example) -> int:
    """Tokens the loss is taken on (as `train` counts them)."""
    return sum(_trained_flags(example))


def segments(example: encoding.Example, tokenizer) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens that are all trained or all untrained, each decoded to its text.

    Each run's text is the growth of the decoded prefix, so the texts joined are exactly the decoded
    example (byte-level and SentencePiece tokenizers alike), special tokens included."""
    runs: list[list[Any]] = []  # [end, trained]
    for i, trained in enumerate(_trained_flags(example)):
        if runs and runs[-1][1] == trained:
            runs[-1][0] = i + 1
        else:
            runs.append([i + 1, trained])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out: list[tuple[str, bool]] = []
    done, start = "", 0
    for end, trained in runs:
        upto = decode(example.input_ids[:end])
        text = upto[len(done) :] if upto.startswith(done) else decode(example.input_ids[start:end])
        out.append((text, trained))
        done, start = upto, end
    return out


Side = tuple[int, str | None, encoding.Example]  # (example index, side name or None, tokens)


def example_sides(example: Any) -> list[tuple[str | None, encoding.Example]]:
    """The tokenized sequences of one training example with their names: a preference pair's chosen and
    rejected sides (`sides()`, as other objectives' examples); an SFT example is its one, unnamed side."""
    if isinstance(example, encoding.Example):
        return [(None, example)]
    return example.sides()


def all_sides(examples: list[Any]) -> list[Side]:
    """Every side of every example, in order, with its example's index."""
    return [(i, name, side) for i, example in enumerate(examples) for name, side in example_sides(example)]


def _named(index: int, side: str | None) -> str:
    return f"example {index}" + (f" ({side})" if side else "")


def example_record(
    index: int, example: encoding.Example, tokenizer, truncated: bool, side: str | None = None
) -> dict[str, Any]:
    """One example (one side of it, `side`, under a preference objective) as `--json` prints it."""
    return {
        "index": index,
        **({"side": side} if side else {}),
        "tokens": len(example),
        "trained_tokens": trained_tokens(example),
        "truncated": truncated,
        "segments": [{"text": t, "trained": trained} for t, trained in segments(example, tokenizer)],
    }


def counts(rows: int, examples: list[Any], stats: encoding.PrepareStats) -> dict[str, int]:
    """Rows in, examples kept, rows skipped (and why), tokens and trained tokens (all sides), truncated
    examples."""
    skipped = len(stats.bad_rows) + stats.dropped_too_long + stats.dropped_no_labels
    sides = [e for _, _, e in all_sides(examples)]
    return {
        "rows": rows,
        "kept": len(examples),
        "skipped": skipped,
        "bad_rows": len(stats.bad_rows),
        "dropped_too_long": stats.dropped_too_long,
        "dropped_no_labels": stats.dropped_no_labels,
        "truncated": stats.truncated,
        "tokens": sum(len(e) for e in sides),
        "trained_tokens": sum(trained_tokens(e) for e in sides),
    }


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _warning(kind: str, message: str) -> dict[str, str]:
    return {"kind": kind, "message": message}


def split_warnings(
    split: str, examples: list[Any], stats: encoding.PrepareStats, tokenizer, max_length: int
) -> list[dict[str, str]]:
    """Labels masked away, responses cut by `max_length`, examples (or sides of one) that train next to
    nothing, a doubled BOS token, in one split."""
    found = []
    sides = all_sides(examples)
    unit = "example" if len(sides) == len(examples) else "example side"  # a pair has two sides
    if stats.dropped_no_labels:
        found.append(
            _warning(
                "all_masked",
                f"{split}: {_n(stats.dropped_no_labels, 'row')} dropped because every label was masked (no response "
                f"token left within data.max_length={max_length})",
            )
        )
    if stats.truncated:
        found.append(
            _warning(
                "truncated",
                f"{split}: {stats.truncated} of {_n(stats.rows, 'row')} cut at data.max_length={max_length}; the rest "
                "of their response and its end-of-turn token are not trained (raise data.max_length, or set "
                "data.truncation: drop)",
            )
        )
    stops = set(templates.stop_token_ids(tokenizer))
    # GRPO's prompts train nothing by design: the model's own completions are what it learns from
    thin = [
        (i, name) for i, name, e in sides if name != "prompt" and all(t in stops for t in _trained_ids(e))
    ]
    if thin:
        found.append(
            _warning(
                "thin",
                f"{split}: {_n(len(thin), unit)} of {len(sides)} train nothing but end-of-turn tokens "
                f"(first: {_named(*thin[0])}): are their responses empty?",
            )
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    doubled = [(i, name) for i, name, e in sides if bos is not None and e.input_ids[:2] == [bos, bos]]
    if doubled:
        found.append(
            _warning(
                "double_bos",
                f"{split}: the BOS token {tokenizer.bos_token} comes twice at the start of {_n(len(doubled), unit)} "
                f"(first: {_named(*doubled[0])}); the rows or the template already begin with it",
            )
        )
    return found


def eos_warning(examples: list[Any], tokenizer) -> dict[str, str] | None:
    """A warning when no example (no side of one) trains any token that generation stops at (EOS or
    end-of-turn)."""
    stops = set(templates.stop_token_ids(tokenizer))
    for _, name, e in all_sides(examples):
        if name == "prompt":  # GRPO: the completions, sampled in training, end on these tokens
            return None
        if any(t and label in stops for t, label in zip(_trained_flags(e), e.labels, strict=True)):
            return None
    names = ", ".join(tokenizer.convert_ids_to_tokens(i) for i in sorted(stops)) or "none"
    return _warning(
        "eos_never_trained",
        f"no training example trains an end-of-turn token ({names}): the model will not learn to stop",
    )


def placeholder_warnings(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, str]]:
    """The placeholder warnings `train` logs: `{{name}}` left unfilled in many rows, `data.fill` names unused."""
    found = placeholders.placeholder_warnings(rows, cfg.data.fill, cfg.data.source)
    return [_warning("placeholder", message.removeprefix("warning: ")) for message in found]


@dataclass
class Report:
    model: str
    source: str
    template: str
    examples: list[dict[str, Any]]  # the first N training examples (each side), as example_record makes them
    counts: dict[str, dict[str, int]]  # "train", "eval"
    warnings: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The last line of `--json`."""
        return {
            "summary": {
                "model": self.model,
                "source": self.source,
                "template": self.template,
                **self.counts,
            },
            "warnings": self.warnings,
        }


def inspect(cfg: Config, n: int) -> Report:
    """Load tokenizer and data exactly as `train(cfg)` does and report on them; writes nothing."""
    from llama_lora.data import dataset
    from llama_lora.model import loader

    tokenizer = loader.load_tokenizer(cfg.model, loader.resolve(cfg.model.name), convert=False)
    train_rows, eval_rows = sources.split_rows(cfg.data, cfg.train.seed)
    ds = dataset.load_dataset(cfg, tokenizer, rows=(train_rows, eval_rows))
    tstats, estats = ds.train_stats, ds.eval_stats
    cut = set(tstats.truncated_examples)
    shown = [example_record(i, e, tokenizer, i in cut, side) for i, side, e in all_sides(ds.train[:n])]
    warnings = placeholder_warnings(train_rows + eval_rows, cfg)
    max_length = cfg.data.max_length
    warnings += split_warnings("train", ds.train, tstats, tokenizer, max_length)
    warnings += split_warnings("eval", ds.eval, estats, tokenizer, max_length)
    eos = eos_warning(ds.train, tokenizer)
    warnings += [eos] if eos else []
    return Report(
        model=cfg.model.name,
        source=cfg.data.source,
        template=ds.template,
        examples=shown,
        counts={
            "train": counts(ds.train_rows, ds.train, tstats),
            "eval": counts(ds.eval_rows, ds.eval, estats),
        },
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------------ output


def json_lines(report: Report) -> list[str]:
    """One JSON object per shown example, then the summary object (counts and warnings)."""
    return [json.dumps(r, ensure_ascii=False) for r in [*report.examples, report.summary()]]


def render_example(record: dict[str, Any], color: bool):
    """A rich Text of one example: trained text green and the rest dim, or (no colour) trained text
    between « and »."""
    from rich.text import Text

    text = Text()
    for seg in record["segments"]:
        if color:
            text.append(seg["text"], style="green" if seg["trained"] else "dim")
        elif seg["trained"]:
            text.append(f"{MARK_OPEN}{seg['text']}{MARK_CLOSE}")
        else:
            text.append(seg["text"])
    return text


def _count_line(split: str, c: dict[str, int]) -> str:
    why = [
        f"{c[key]} {label}"
        for key, label in (
            ("bad_rows", "bad"),
            ("dropped_too_long", "too long"),
            ("dropped_no_labels", "all labels masked"),
        )
        if c[key]
    ]
    skipped = f"{c['skipped']} skipped" + (f" ({', '.join(why)})" if why else "")
    return (
        f"{split}: {c['rows']} rows, {c['kept']} kept, {skipped}; {c['tokens']} tokens, "
        f"{c['trained_tokens']} trained; {c['truncated']} truncated"
    )


def render(report: Report, color: bool) -> list:
    """What the terminal shows: the examples, then the counts and the warnings (rich renderables)."""
    from rich.text import Text

    out: list = []
    for record in report.examples:
        flags = ", truncated" if record["truncated"] else ""
        name = _named(record["index"], record.get("side"))
        header = f"── {name}: {record['tokens']} tokens, {record['trained_tokens']} trained{flags}"
        out += [Text(header, style="bold cyan" if color else ""), render_example(record, color)]
        if not record["segments"] or not record["segments"][-1]["text"].endswith("\n"):
            out.append(Text(""))  # one blank line after each example
    legend = "green: trained, dim: not trained" if color else f"{MARK_OPEN}...{MARK_CLOSE}: trained"
    out.append(Text(f"{report.source} with {report.model}, template {report.template} ({legend})"))
    out += [
        Text(_count_line(split, c)) for split, c in report.counts.items() if split == "train" or c["rows"]
    ]
    if not report.warnings:
        out.append(Text("no warnings", style="green" if color else ""))
    for w in report.warnings:
        out.append(Text(f"warning: {w['message']}", style="yellow" if color else ""))
    return out
