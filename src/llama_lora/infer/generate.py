"""Generation: prompts rendered as training rendered them, then one, many (left-padded batch) or streamed
generations that stop at the end-of-turn token, with the context length checked first; and the greedy probe
merge and export check their output with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from llama_lora.data import encoding, formats, templates
from llama_lora.data.batching import pad_id_for
from llama_lora.infer.loading import InferenceError, Loaded
from llama_lora.infer.sampling import Sampling


@dataclass
class GenerationSettings(Sampling):
    """The engine's per-sequence `Sampling`, with what transformers' `generate` takes for the same settings."""

    def kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


def render_prompt(loaded: Loaded, messages: list[formats.Message]) -> list[int]:
    """Token ids of the prompt, produced exactly as training produced the prompt part of a row."""
    if loaded.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": loaded.system_prompt}, *messages]
    text = templates.prompt_text(messages, loaded.tokenizer, loaded.template, loaded.tools)
    return encoding.tokenize([(text, False)], loaded.tokenizer).input_ids


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stopped: bool  # ended on an end-of-turn/EOS token (not cut by max_new_tokens)


class TextPieces:
    """New tokens -> the text they add, as the final text decodes them (a multi-byte character waits for the
    rest of its bytes), so that streamed pieces join to the final text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, *tokens: int) -> str:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def rest(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.shown = text[len(self.shown) :], text
        return piece


class _PrintStreamer:
    """transformers' streamer interface over `TextPieces`: prints decoded text as tokens arrive."""

    def __init__(self, tokenizer, stop_ids: list[int], write):
        self.pieces, self.stop_ids, self.write = TextPieces(tokenizer), set(stop_ids), write
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() passes the prompt first
            self.first = False
            return
        self.write(self.pieces.add(*(int(t) for t in value.reshape(-1) if int(t) not in self.stop_ids)))

    def end(self) -> None:
        self.write(self.pieces.rest())


def _pad_id(loaded: Loaded) -> int:
    return pad_id_for(loaded.tokenizer, fallback=loaded.stop_ids[0] if loaded.stop_ids else None)


def _finish(loaded: Loaded, new: list[int], prompt_tokens: int) -> Generation:
    """Cut the new tokens at the first end-of-turn/EOS token (padding may follow it in a batch) and decode."""
    end = next((k for k, t in enumerate(new) if t in loaded.stop_ids), None)
    if end is not None:
        new = new[:end]
    return Generation(
        loaded.tokenizer.decode(new, skip_special_tokens=True), new, prompt_tokens, end is not None
    )


def check_context(loaded: Loaded, ids: list[int]) -> int | None:
    """The model's context length (None if unknown); raises InferenceError when the prompt leaves no room."""
    limit = context_length(loaded.model)
    if limit is not None and len(ids) >= limit:
        raise InferenceError(f"the prompt is {len(ids)} tokens, longer than the model's context of {limit}")
    return limit


def _stop_when(should_stop):
    """A stopping criterion asking `should_stop()` after every token (a cancelled request, a stop string)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), bool(should_stop()), device=input_ids.device)

    return StoppingCriteriaList([StopWhen()])


def generate(
    loaded: Loaded,
    messages: list[formats.Message],
    settings: GenerationSettings,
    stream=None,
    should_stop=None,
) -> Generation:
    """Generate a reply to `messages`. `stream(text)` receives text pieces as they are produced;
    `should_stop()`, asked after every token, ends generation early when it returns True."""
    return generate_ids(loaded, render_prompt(loaded, messages), settings, stream, should_stop)


@torch.no_grad()
def generate_ids(
    loaded: Loaded, ids: list[int], settings: GenerationSettings, stream=None, should_stop=None
) -> Generation:
    """`generate` on a prompt that is already token ids.

    In bf16 (`loaded.precision`, where decode.py runs the model) it runs on the engine; in float32 on
    transformers' `generate`, which is faster than the engine for one float32 sequence (bench/RESULTS.md)
    and gives the same greedy tokens (tests/infer/test_engine.py)."""
    from llama_lora.infer import decode

    limit = check_context(loaded, ids)
    max_new = settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit - len(ids))
    if loaded.precision == "bf16" and decode.unsupported(loaded.model) is None:
        return _on_engine(
            loaded, ids, dataclasses.replace(settings, max_new_tokens=max_new), stream, should_stop
        )
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    input_ids = torch.tensor([ids], device=loaded.device)
    streamer = _PrintStreamer(loaded.tokenizer, loaded.stop_ids, stream) if stream else None
    out = loaded.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new,
        eos_token_id=loaded.stop_ids,
        pad_token_id=_pad_id(loaded),
        streamer=streamer,
        stopping_criteria=_stop_when(should_stop) if should_stop else None,
        **settings.kwargs(),
    )
    return _finish(loaded, out[0, len(ids) :].tolist(), len(ids))


def _engine(loaded: Loaded, slots: int, context: int | None):
    """An engine over `loaded`'s model; in bf16 it decodes with `loaded.decoder`, made here the first time and
    reused by later calls (infer's rows, chat's turns) while the weights stay as they are."""
    from llama_lora.infer.decode import decoder_for
    from llama_lora.infer.engine import Engine

    if loaded.precision == "bf16" and loaded.decoder is None:
        loaded.decoder = decoder_for(loaded.model)
    return Engine(
        loaded.model,
        loaded.stop_ids,
        slots=slots,
        context=context,
        precision=loaded.precision,
        decoder=loaded.decoder,
    )


def _generation(loaded: Loaded, seq) -> Generation:
    """An engine sequence's result as `generate` returns it."""
    text = loaded.tokenizer.decode(seq.tokens, skip_special_tokens=True)
    return Generation(text, seq.tokens, len(seq.prompt), seq.finish == "stop")


def _on_engine(loaded: Loaded, ids: list[int], settings: Sampling, stream, should_stop) -> Generation:
    pieces = TextPieces(loaded.tokenizer)

    def on_token(token: int) -> str | None:
        if stream is not None:
            stream(pieces.add(token))
        return "cancelled" if should_stop is not None and should_stop() else None

    (seq,) = _engine(loaded, 1, context_length(loaded.model)).generate([ids], settings, on_token=on_token)
    if stream is not None:
        stream(pieces.rest())
    return _generation(loaded, seq)


def generate_many(
    loaded: Loaded,
    conversations: list[list[formats.Message]],
    settings: GenerationSettings,
    batch_size: int = 32,
) -> list[Generation]:
    """Replies for many prompts through the engine (engine.py): up to `batch_size` sequences decode together,
    each joining as another finishes, each with its own generator seeded from `settings.seed`. In float32 each
    reply is what the prompt gets alone (greedy: `generate`'s, tested). In bf16 a step's products round
    according to how many rows share it (1-2 rows: torch's kernel, more: oneDNN's), so where two tokens are
    nearly tied a reply can differ from the one it gets alone. 32 rows: 18% faster than 16 on compare's
    48 prompts (bench/RESULTS.md)."""
    prompts = [render_prompt(loaded, m) for m in conversations]
    limit = context_length(loaded.model)
    for ids in prompts:
        if limit is not None and len(ids) + settings.max_new_tokens > limit:
            raise InferenceError(
                f"a prompt is {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                f"it exceeds the model's context of {limit}"
            )
    done = _engine(loaded, batch_size, limit).generate(prompts, settings)
    return [_generation(loaded, s) for s in done]


@torch.no_grad()
def greedy_probe(
    model, prompts: list[list[int]], new_tokens: int, stop_ids: list[int] | None = None
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """The logits over each prompt (float32, on the CPU) and up to `new_tokens` greedy tokens after it, from a
    plain cached forward loop, so that two models (merged vs unmerged, GGUF vs source) can be compared.

    With `stop_ids` a prompt's tokens end before the first stop token (what `generate` returns); without, all
    `new_tokens` are produced, so every position is compared.
    """
    device = next(model.parameters()).device
    stops = set(stop_ids or ())
    logits, tokens = [], []
    for ids in prompts:
        result = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        logits.append(result.logits[0].float().cpu())
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(result.logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
            if len(out) < new_tokens:  # the last token needs no forward pass of its own
                step = torch.tensor([[token]], device=device)
                result = model(input_ids=step, cache=result.cache, use_cache=True)
        tokens.append(out)
    return logits, tokens
