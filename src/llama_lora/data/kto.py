"""KTO rows: one answer to a prompt, labelled desirable or undesirable -> tokenized examples, each with the
mismatched (prompt, answer) sequence that KTO's reference point is estimated from.

Row forms (the first that fits):

- TRL's unpaired form: `prompt` (a string or messages), `completion` (a string, one assistant message or a
  list of them) and a boolean `label`;
- LLaMA-Factory: `messages` (or ShareGPT `conversations`) ending on the assistant answer, and a boolean
  `label` (`kto_tag` in older files); earlier turns are the prompt;
- turbo-alignment: `context` (messages, role `bot` for the assistant), `answer` (one message) and
  `is_desirable`;
- a preference pair in any form pairs.py reads: its chosen answer becomes a desirable row and its rejected
  one an undesirable row, as TRL unpairs a pair dataset (the rejected rows come after all the chosen ones).

The prompt must end on a user turn. A top-level `system` string (or `data.system_prompt`) opens it, as for
pairs. The KL sequence of a row is its prompt followed by the answer of the row before it within each block
of `train.batch_size` rows (the block's first row takes its last row's answer): TRL's rotation. Only the
answer and its end-of-turn token are trained; an undesirable answer is trained away from, never towards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_lora.data import encoding, formats, pairs, placeholders, tool_calls
from llama_lora.data.formats import Message
from llama_lora.errors import DataError

LABEL_KEYS = ("label", "kto_tag", "is_desirable")


@dataclass
class KTOExample:
    example: encoding.Example  # prompt + answer, the answer trained
    kl: encoding.Example  # the same prompt + another row's answer: the KL estimate's sequence
    desirable: bool
    ref: float | None = None  # the reference model's summed log-probs, filled in by the trainer
    ref_kl: float | None = None

    def __len__(self) -> int:  # the token budget counts the answer: the KL rows run without gradient
        return len(self.example)

    def sides(self) -> list[tuple[str, encoding.Example]]:
        return [("desirable" if self.desirable else "undesirable", self.example)]


def _label(row: dict[str, Any]) -> bool:
    for key in LABEL_KEYS:
        if row.get(key) is not None:
            if not isinstance(row[key], bool):
                raise ValueError(f"'{key}' must be true or false, not {row[key]!r:.40}")
            return row[key]
    raise ValueError("no desirable/undesirable label (a boolean 'label', 'kto_tag' or 'is_desirable')")


def kto_messages(
    row: dict[str, Any], system_prompt: str | None = None
) -> list[tuple[list[Message], Message, bool]]:
    """(prompt messages, answer message, desirable) of one row: two for a preference pair, else one.
    Raises ValueError with a short reason for a row that is not usable."""
    kind = formats.preference_kind(row)
    if kind is not None and not kind.startswith("KTO"):
        prompt, chosen, rejected = pairs.pair_messages(row, system_prompt)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    desirable = _label(row)
    if row.get("context") is not None or row.get("answer") is not None:  # turbo-alignment
        prompt = pairs._messages(row.get("context"), "'context'")
        answer = pairs._response(row.get("answer"), "answer", [])
    elif row.get("completion") is not None:
        given = row.get("prompt")
        if isinstance(given, str):
            prompt = [{"role": "user", "content": given}] if given.strip() else []
        else:
            prompt = pairs._messages(given, "'prompt'")
        answer = pairs._response(row["completion"], "completion", prompt)
    elif formats._turns(row) is not None:
        turns = pairs._messages(formats._turns(row), "'messages'")
        if turns[-1]["role"] != "assistant":
            raise ValueError(
                f"the last message must be the assistant's answer, not a {turns[-1]['role']} turn"
            )
        prompt, answer = turns[:-1], pairs._response(turns[-1:], "answer", [])
    else:
        raise ValueError("no answer: give 'completion' (with 'prompt'), 'messages' or 'context'/'answer'")
    return [(pairs.opened_prompt(prompt, row, system_prompt), answer, desirable)]


@dataclass
class _Answered:
    prompt: list[Message]
    answer: Message
    desirable: bool
    tools: list[dict[str, Any]] | None
    example: encoding.Example
    index: int
    cut: bool  # its answer was cut at max_length


def _rows(rows, tokenizer, dcfg, template: str, where: str, stats) -> list[_Answered]:
    """Every usable answer of `rows`, rendered, tokenized and fitted to max_length (counted in `stats`)."""
    kept: list[_Answered] = []
    later: list[_Answered] = []  # the rejected answers of pairs, after every chosen one (TRL's unpairing)

    def render(row: dict[str, Any]) -> list[tuple[list[Message], Message, bool, Any, encoding.Example]]:
        tools = tool_calls.row_tools(row) or None
        return [
            (
                prompt,
                answer,
                good,
                tools,
                pairs.answer_example(prompt, answer, tokenizer, template, tools, dcfg.train_on_reasoning),
            )
            for prompt, answer, good in kto_messages(row, dcfg.system_prompt)
        ]

    for index, row in enumerate(rows):
        row = placeholders.fill_placeholders(row, dcfg.fill)
        rendered = encoding.try_row(stats, index, where, render, row) or []
        stats.rows += max(len(rendered) - 1, 0)  # a pair is two answers, counted as two rows from here on
        for n, (prompt, answer, good, tools, ex) in enumerate(rendered):
            truncated = stats.truncated
            ex = encoding.within_max_length(ex, index, dcfg, tokenizer, stats)
            if ex is None:
                continue
            if all(label == encoding.IGNORE for label in ex.labels[1:]):
                stats.dropped_no_labels += 1
                continue
            item = _Answered(prompt, answer, good, tools, ex, index, stats.truncated > truncated)
            (later if n == 1 else kept).append(item)
    return kept + later


def prepare_kto(
    rows: list[dict[str, Any]], tokenizer, dcfg, template: str, where: str = "data", block: int = 8
) -> tuple[list[KTOExample], encoding.PrepareStats]:
    """Rows -> KTO examples, as `encoding.prepare` does for SFT: the same truncation policy (the answer's
    sequence is fitted; its KL sequence is cut the same way but never counted or dropped), bad rows a
    DataError unless `dcfg.skip_bad_rows`. `block`: the KL rotation's block, train.batch_size."""
    stats = encoding.PrepareStats(rows=len(rows))
    answered = _rows(rows, tokenizer, dcfg, template, where, stats)
    loose = dcfg.model_copy(update={"truncation": "truncate"})
    examples: list[KTOExample] = []
    for start in range(0, len(answered), block):
        group = answered[start : start + block]
        for k, item in enumerate(group):
            other = group[k - 1].answer  # k = 0 takes the block's last answer
            try:
                kl = pairs.answer_example(
                    item.prompt, other, tokenizer, template, item.tools, dcfg.train_on_reasoning
                )
            except Exception as exc:
                raise DataError(
                    f"{where}: row {item.index}: its prompt with another row's answer (the KL estimate) "
                    f"cannot be rendered ({exc})"
                ) from None
            kl = encoding.within_max_length(kl, item.index, loose, tokenizer, encoding.PrepareStats())
            if item.cut:
                stats.truncated_examples.append(len(examples))
            examples.append(KTOExample(item.example, kl, item.desirable))
    stats.kept = len(examples)
    encoding.refuse_bad_rows(stats, dcfg, where, "are not usable KTO rows")
    return examples, stats
