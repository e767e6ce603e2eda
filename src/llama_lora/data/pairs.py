"""Preference pairs for DPO/ORPO: rows -> (prompt, chosen, rejected) messages -> two tokenized sides.

Row forms (the first that fits):

- TRL explicit prompt: `prompt` (a string, one user turn, or a message list) with `chosen`/`rejected`
  each a string, one message or a list of assistant messages (the last one is the response);
- ShareGPT (LLaMA-Factory) or OpenAI messages: `conversations`/`messages` ending on a user turn, with
  `chosen`/`rejected` as single `{from, value}` / `{role, content}` objects (or strings);
- TRL implicit prompt: `chosen`/`rejected` are whole conversations; their common leading messages are the
  prompt and the final assistant message of each is the response (LLaMA-Factory v1's `chosen_messages` /
  `rejected_messages` too);
- OpenAI's preference fine-tuning format: `input.messages`, `preferred_output`, `non_preferred_output`;
- HH-RLHF: `chosen`/`rejected` whole `\n\nHuman: ...\n\nAssistant: ...` transcripts, split at the last
  Assistant turn (an empty answer on either side is a bad pair).

A top-level `system` string (or `data.system_prompt` when the row has none) opens the prompt, as in
`formats.to_messages`. Only the final response of each side is trained: earlier assistant turns of a
multi-turn prompt are context, labelled -100 like the rest of the prompt. Both sides share the prompt's
token ids exactly, so the prompt cancels out of the DPO log-ratios.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llama_lora.data import encoding, formats, placeholders, templates, tool_calls
from llama_lora.data.formats import Message
from llama_lora.errors import DataError


@dataclass
class PairExample:
    chosen: encoding.Example
    rejected: encoding.Example
    ref_chosen: float | None = None  # the reference model's summed log-probs, filled in by the trainer
    ref_rejected: float | None = None

    def __len__(self) -> int:  # the token budget of a batch counts both sides
        return len(self.chosen) + len(self.rejected)

    def sides(self) -> list[tuple[str, encoding.Example]]:
        """Each tokenized side with its name, as `data inspect` shows them."""
        return [("chosen", self.chosen), ("rejected", self.rejected)]


def _messages(value: Any, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of messages")
    return formats._conversation({"messages": value})


def _response(value: Any, what: str, prompt: list[Message]) -> Message:
    """One side's response: a string, one message, or assistant message(s) (after the prompt, if the list
    repeats it): the last of them."""
    if isinstance(value, str):
        msg: Message = {"role": "assistant", "content": value}
    elif isinstance(value, dict):
        msg = _messages([value], f"'{what}'")[0]
    elif isinstance(value, list):
        msgs = _messages(value, f"'{what}'")
        if prompt and msgs[: len(prompt)] == prompt:
            msgs = msgs[len(prompt) :]
        if not msgs or any(m["role"] != "assistant" for m in msgs):
            raise ValueError(f"'{what}' must hold only assistant turns after the prompt")
        msg = msgs[-1]
    else:
        raise ValueError(f"'{what}' must be a string, a message or messages, not {type(value).__name__}")
    if msg["role"] != "assistant":
        raise ValueError(f"'{what}' is a {msg['role']} turn, not an assistant response")
    if not tool_calls.assistant_text(msg).strip():
        raise ValueError(f"empty '{what}' response")
    return msg


def _implicit(chosen: Any, rejected: Any) -> tuple[list[Message], Message, Message]:
    """TRL's implicit prompt: the common leading messages of two whole conversations."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError(
            "no prompt: give 'prompt' (or 'conversations'), or 'chosen'/'rejected' as conversations"
        )
    c, r = _messages(chosen, "'chosen'"), _messages(rejected, "'rejected'")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if len(c) == len(r) == n:
        raise ValueError("'chosen' and 'rejected' are identical")
    if len(c) != n + 1 or len(r) != n + 1:
        raise ValueError("'chosen' and 'rejected' must differ only in their final assistant turn")
    return c[:n], _response([c[-1]], "chosen", []), _response([r[-1]], "rejected", [])


HH_TAG = re.compile(r"\n\n(Human|Assistant):")  # a speaker tag counts only after a blank line


def _hh_turns(transcript: str, what: str) -> tuple[list[Message], str]:
    """An HH-RLHF transcript (`\n\nHuman: ...\n\nAssistant: ...`) -> (the turns before its last Assistant
    turn, that turn's text)."""
    pieces = HH_TAG.split(transcript)
    if pieces[0].strip():
        raise ValueError(f"'{what}' has text before its first '\\n\\nHuman:' tag")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[tag], "content": text.strip()} for tag, text in zip(pieces[1::2], pieces[2::2])]
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(f"'{what}' does not end on an Assistant turn")
    return turns[:-1], turns[-1]["content"]


def _normalized(row: dict[str, Any]) -> dict[str, Any]:
    """The other projects' pair forms as the forms below take them: LLaMA-Factory v1's `chosen_messages` /
    `rejected_messages` (whole conversations: the implicit-prompt form), OpenAI's preference format
    (`input.messages`, `preferred_output`, `non_preferred_output`) and HH-RLHF transcripts (no prompt: split
    at the last `\n\nAssistant:`, the two prefixes identical)."""
    if "chosen_messages" in row or "rejected_messages" in row:
        return {
            "chosen": row.get("chosen_messages"),
            "rejected": row.get("rejected_messages"),
            "system": row.get("system"),
        }
    if "preferred_output" in row or "non_preferred_output" in row:
        given = row.get("input")
        turns = given.get("messages") if isinstance(given, dict) else None
        if not turns:
            raise ValueError("no 'input.messages' before 'preferred_output'")
        return {
            "messages": turns,
            "chosen": row.get("preferred_output"),
            "rejected": row.get("non_preferred_output"),
        }
    if formats.hh_transcripts(row):
        chosen, rejected = row["chosen"], row["rejected"]
        (prompt, good), (prompt_r, bad) = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
        if prompt != prompt_r:
            raise ValueError("the two HH-RLHF transcripts differ before their last Assistant turn")
        return {"messages": prompt, "chosen": good, "rejected": bad}
    return row


def pair_messages(
    row: dict[str, Any], system_prompt: str | None = None
) -> tuple[list[Message], Message, Message]:
    """(prompt messages, chosen assistant message, rejected assistant message) of one preference row.
    Raises ValueError with a short reason for a row that is not a usable pair."""
    row = _normalized(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if chosen is None and rejected is None:
        raise ValueError("not a preference pair (no 'chosen'/'rejected' fields)")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None or (isinstance(value, (str, list, dict)) and not value):
            raise ValueError(f"no {name!r} response")
    if row.get("prompt") is not None:
        given = row["prompt"]
        if isinstance(given, str):
            if not given.strip():
                raise ValueError("empty 'prompt'")
            prompt = [{"role": "user", "content": given}]
        else:
            prompt = _messages(given, "'prompt'")
        chosen_msg = _response(chosen, "chosen", prompt)
        rejected_msg = _response(rejected, "rejected", prompt)
    elif formats._turns(row) is not None:
        prompt = _messages(formats._turns(row), "'conversations'")
        chosen_msg = _response(chosen, "chosen", prompt)
        rejected_msg = _response(rejected, "rejected", prompt)
    else:
        prompt, chosen_msg, rejected_msg = _implicit(chosen, rejected)
    if chosen_msg == rejected_msg:
        raise ValueError("'chosen' and 'rejected' are identical")
    return opened_prompt(prompt, row, system_prompt), chosen_msg, rejected_msg


def opened_prompt(prompt: list[Message], row: dict[str, Any], system_prompt: str | None) -> list[Message]:
    """The prompt of a pair or a KTO row, opened by the row's `system` string (or `data.system_prompt`) unless
    it has a system turn; it must end on a user turn, which the answer answers."""
    if not prompt:
        raise ValueError("no prompt before the response")
    if prompt[0]["role"] != "system":
        system = formats._text(row.get("system")).strip() or system_prompt
        prompt = ([{"role": "system", "content": system}] if system else []) + prompt
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt must end on a user turn, not {prompt[-1]['role']}")
    return prompt


def answer_example(
    prompt: list[Message], response: Message, tokenizer, template: str, tools, train_on_reasoning: bool = True
) -> encoding.Example:
    """prompt + [response] tokenized with only the final response (and its end-of-turn token) trained (its
    reasoning block too unless `train_on_reasoning` is False)."""
    segments = templates.render_segments(prompt + [response], tokenizer, template, tools, train_on_reasoning)
    last = max((i for i, (_, train) in enumerate(segments) if train), default=-1)
    if last == -1:
        raise ValueError("the template rendered no response")
    segments = [(text, train and i == last) for i, (text, train) in enumerate(segments)]
    return encoding.tokenize(segments, tokenizer, train_on_prompt=False)


def _trained_from(ex: encoding.Example) -> int:
    return next((i for i, label in enumerate(ex.labels) if label != encoding.IGNORE), len(ex.labels))


def _cut(ex: encoding.Example, n: int) -> encoding.Example:
    return encoding.Example(ex.input_ids[:n], ex.labels[:n])


def _sides(row: dict[str, Any], tokenizer, dcfg, template: str) -> list[encoding.Example]:
    prompt, chosen, rejected = pair_messages(row, dcfg.system_prompt)
    tools = tool_calls.row_tools(row) or None
    return [
        answer_example(prompt, answer, tokenizer, template, tools, dcfg.train_on_reasoning)
        for answer in (chosen, rejected)
    ]


def prepare_pairs(
    rows: list[dict[str, Any]], tokenizer, dcfg, template: str, where: str = "data"
) -> tuple[list[PairExample], encoding.PrepareStats]:
    """Rows -> tokenized pairs, as `encoding.prepare` does for single responses.

    A pair longer than `dcfg.max_length` has its prompt cut from the left (`encoding.fit_prompt`) and its answers
    from the right; with `truncation: drop` it is dropped, with `truncation: error` it is a bad row. Bad rows are a DataError naming the first
    one and their count, unless `dcfg.skip_bad_rows`, when they are skipped and counted in the stats.
    KTO rows are a DataError: they hold one response each, not a pair."""
    stats = encoding.PrepareStats(rows=len(rows))
    pairs: list[PairExample] = []
    limit = dcfg.max_length
    for index, row in enumerate(rows):
        kind = formats.preference_kind(row)
        if kind is not None and kind.startswith("KTO"):
            raise DataError(
                f"{where}: row {index} is {kind}, one answer each; train it with train.objective: kto "
                "(dpo and orpo need chosen/rejected pairs)"
            )
        row = placeholders.fill_placeholders(row, dcfg.fill)
        sides = encoding.try_row(stats, index, where, _sides, row, tokenizer, dcfg, template)
        if sides is None:
            continue
        starts = [_trained_from(ex) for ex in sides]
        if starts[0] != starts[1] or sides[0].input_ids[: starts[0]] != sides[1].input_ids[: starts[1]]:
            raise RuntimeError(
                f"{where}: row {index}: the two sides do not share the prompt's token ids (a bug)"
            )
        longest = max(len(ex) for ex in sides)
        if longest > limit and dcfg.truncation != "truncate":
            if dcfg.truncation == "drop":
                stats.dropped_too_long += 1
            else:  # "error": the row is a bad row, as a too-long prompt was before the truncation policy
                stats.bad_rows.append(f"row {index}: {longest} tokens, longer than max_length {limit}")
            continue
        if longest > limit:
            sides, kept = encoding.fit_prompt(sides, starts[0], limit, tokenizer)
            if kept < starts[0]:
                stats.prompts_cut += 1
            if any(len(ex) > limit for ex in sides):
                sides = [_cut(ex, limit) for ex in sides]
                stats.truncated += 1
            stats.truncated_examples.append(len(pairs))
        pairs.append(PairExample(*sides))
    stats.kept = len(pairs)
    encoding.refuse_bad_rows(stats, dcfg, where, "are not usable preference pairs")
    return pairs, stats
