"""Completions of the policy being trained, for GRPO: sampled through the generation engine (infer/engine.py)
in this process, from the adapter as it is at this step, with no weights copied to another server.

In bf16 on a CPU the engine decodes on bf16 copies of the weights with the adapter folded in (infer/decode.py:
made again at every call, a fraction of a second for a small model against seconds of sampling); elsewhere it
runs the model's own forward, in eval mode, without gradients.

Every completion's random draws come from its own generator, seeded from (train.seed, step, its position in
the step), so a run resumed from a checkpoint samples exactly what the uninterrupted run sampled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llama_lora.infer.decode import decoder_for
from llama_lora.infer.engine import Engine
from llama_lora.infer.sampling import Sampling

MAX_SLOTS = 256  # sequences decoding together at most


@dataclass
class Completion:
    tokens: list[int]  # the sampled tokens, with the stop token that ended it
    text: str  # the decoded text, without special tokens
    truncated: bool  # stopped at max_completion_length, not by a stop token


def seed_for(seed: int, step: int, position: int) -> int:
    """A completion's own sampling seed: the same for the same run, step and position, whatever else runs."""
    return hash((seed, step, position)) & (2**62 - 1)


class Rollouts:
    """Samples completions of `model` (the PeftModel being trained) for prompt token ids."""

    def __init__(self, model, tokenizer, stop_ids: list[int], bf16: bool, context: int | None):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, stop_ids
        self.bf16, self.context = bf16, context
        self.seconds = 0.0  # time spent sampling, since the last `take_seconds`

    def sample(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None
    ) -> list[Completion]:
        """One completion per prompt (repeat a prompt for several), in prompt order. `seeds`: each
        completion's seed (None: greedy settings need none)."""
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                decoder = decoder_for(self.model) if self.bf16 else None
                engine = Engine(
                    self.model,
                    self.stop_ids,
                    slots=min(len(prompts), MAX_SLOTS),
                    context=self.context,
                    precision="bf16" if decoder is not None else "fp32",
                    decoder=decoder,
                    log=lambda *a: None,
                )
                settings = (
                    [sampling] * len(prompts)
                    if seeds is None
                    else [Sampling(**{**vars(sampling), "seed": s}) for s in seeds]
                )
                seqs = engine.generate(prompts, settings)
        finally:
            self.model.train(was_training)
        self.seconds += time.perf_counter() - start
        out = []
        for seq in seqs:
            if seq.finish == "error":
                raise RuntimeError(f"sampling failed: {seq.error}")
            tokens = seq.tokens + ([seq.stop_token] if seq.stop_token is not None else [])
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            out.append(Completion(tokens, text, seq.finish == "length"))
        return out

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds
