"""The generation engine: one loaded model generating for many sequences at once (continuous batching).

Sequences wait in a queue; between decode steps the engine admits waiting ones (each prompt's prefill, its
keys and values then copied into a free slot of the engine's own cache) and drops finished or cancelled ones,
so requests join and leave a running batch. A decode step runs the model once over every live sequence: one
new token each, at its own position, attending to its own slot only. Each sequence samples with its own
settings and generator (sampling.py), and is streamed token by token.

The cache (`SlotCache`) keeps, per layer, keys and values of shape (slots, kv heads, capacity, head dim). Live
sequences occupy slots 0..B-1 in order (a finishing sequence's slot takes the last live one's contents), so a
step reads `[:B, :, :longest]`, a view, and a (B, 1, 1, longest) mask hides each row's unused positions. The
capacity doubles when a sequence needs more. In float32 the model is transformers' own (any model that
accepts a cache object with `update` and a ready 4D mask); in bf16 a Llama-family model runs on decode.py's
bf16 copies, one set per group (the group's adapter folded in).

Why not transformers' `generate_batch` (ContinuousBatchingManager with its paged CPU cache): on this project's
CPU it served 16 concurrent prompts at about two thirds of this loop's rate (bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from llama_lora.infer.decode import Bf16Decoder, decoder_for, unsupported
from llama_lora.infer.sampling import Sampling, choose, penalize
from llama_lora.infer.slot_cache import SlotCache

__all__ = ["Engine", "Sequence", "SlotCache"]

_NO_GROUP = object()  # before the first sequence: any group switches


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its prompt, settings, the tokens so far and how it ended."""

    id: int
    prompt: list[int]
    sampling: Sampling
    # called from the engine's thread with each new token; a returned reason ("stop", "cancelled") ends it
    on_token: Callable[[int], str | None] | None = None
    on_end: Callable[[Sequence], None] | None = None  # called from the engine's thread when it ends
    group: str | None = None  # the adapter it runs with (`Engine.select`); one group decodes at a time
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (a stop token or string), "length", "cancelled", "error"
    error: str | None = None  # what went wrong, for "error"
    generator: torch.Generator | None = None
    stop_token: int | None = None  # the stop token that ended it (not in `tokens`)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (the slot is freed at the engine's next step)."""
        self.cancelled = True

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class Engine:
    """Continuous batching over one model (see module doc). Thread-safe `submit`; `step` or `run` drive it."""

    def __init__(
        self,
        model,
        stop_ids: list[int],
        slots: int = 16,
        context: int | None = None,
        decode=None,
        select=None,
        log=print,
        precision: str = "fp32",
        decoder: Bf16Decoder | None = None,
    ):
        """`decode(ids) -> text` serves stop strings; `select(group)` is a context manager under which the
        model runs as `group` asks (an adapter active, or none), entered when the running group changes:
        sequences of one group decode together, the next group's join when the batch has drained.
        `precision` "bf16": prefill and decode steps run on bf16 copies of the weights (decode.py) where the
        model allows (a Llama-family model): one decoder per group, made the first time the group runs, of
        the model as `select` sets it (the group's adapter folded into the copies); `decoder`: one made
        before for the model as it is (no group), its copies reused."""
        self.model = model
        self.precision = precision
        self._decoders: dict[object, Bf16Decoder | None] = {} if decoder is None else {None: decoder}
        self.select = select
        self.log = log
        self._group: object = _NO_GROUP
        self._group_context = contextlib.ExitStack()
        self.stop_ids = set(stop_ids)
        self.slots = slots
        self.context = context or getattr(model.config, "max_position_embeddings", None) or 2048
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        bf16_decoding = precision == "bf16" and self.dtype != torch.float32  # float32 weights: nothing to do
        if bf16_decoding and (decoder is not None or unsupported(model) is None):
            self.dtype = (
                torch.float32
            )  # decode.py keeps keys and values in float32, whatever the weights' dtype
        self.cache = SlotCache(model.config, slots, self.dtype, self.device)
        self.decode_text = decode  # ids -> text, for stop strings
        self.live: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.ids = itertools.count()
        self.tasks: list[tuple[Callable[[], object], str | None, Future]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests
    def submit(
        self, prompt: list[int], sampling: Sampling, on_token=None, on_end=None, group: str | None = None
    ) -> Sequence:
        if not prompt:
            raise ValueError("an empty prompt")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt is {len(prompt)} tokens, the model's context {self.context}")
        seq = Sequence(next(self.ids), list(prompt), sampling, on_token, on_end, group)
        seq.generator = sampling.generator()
        with self.lock:
            self.waiting.append(seq)
        self.wake.set()
        return seq

    def generate(
        self, prompts: list[list[int]], sampling: Sampling | list[Sampling], on_token=None
    ) -> list[Sequence]:
        """Every prompt through the engine (in this thread when no background loop runs); in prompt order."""
        settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        seqs = [self.submit(p, s, on_token=on_token) for p, s in zip(prompts, settings)]
        if self._thread is None:
            while not all(s.done.is_set() for s in seqs):
                self.step()
        for s in seqs:
            s.done.wait()
        return seqs

    def stream(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        """The new tokens of one request as they come (needs the background loop: `start`)."""
        import queue

        box: queue.Queue = queue.Queue()
        seq = self.submit(prompt, sampling, on_token=box.put)
        try:
            while not (seq.done.is_set() and box.empty()):
                try:
                    yield box.get(timeout=0.1)
                except queue.Empty:
                    continue
        finally:
            seq.cancel()

    def call(self, fn: Callable[[], object], after: str | None = None) -> Future:
        """Run `fn()` in the engine's thread between two steps (where the model may change: an adapter
        loaded or removed); with `after`, only once no sequence of that group is live or waiting."""
        future: Future = Future()
        with self.lock:
            self.tasks.append((fn, after, future))
        self.wake.set()
        if self._thread is None:
            self._run_tasks()
        return future

    # ---- the loop
    def start(self) -> None:
        """Run the engine in a background thread (serve); `stop` ends it."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llama-lora-engine", daemon=True)
            self._thread.start()

    def run_here(self, until: Callable[[], bool]) -> None:
        """Drive the engine from the calling thread until `until()` is true (checked at least every 0.5 s).
        serve runs it in the main thread: there torch's parallel kernels run at full rate, in another thread
        at about two thirds of it (bench/RESULTS.md)."""
        self._thread = threading.current_thread()
        try:
            self._loop(until)
        finally:
            self._thread = None

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        while not self._stopping and not (until is not None and until()):
            try:
                busy = self.step()
            except Exception as exc:  # one failing step must not take every later request down
                self.log(f"generation failed: {type(exc).__name__}: {exc}")
                self._fail(f"{type(exc).__name__}: {exc}")
                continue
            if not busy:
                self.wake.wait(0.5)
                self.wake.clear()
        self._group_context.close()

    def _fail(self, message: str) -> None:
        """End every live sequence with an error (their cache rows are suspect after a failed step)."""
        for seq in list(self.live):
            seq.error = message
            self._end(seq, "error")

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting sequences, run one decode step over the live ones; False when there was no work."""
        self._drop_cancelled()
        self._run_tasks()
        admitted = self._admit()
        if not self.live:
            return admitted
        self._decode()
        return True

    def _admit(self) -> bool:
        """Waiting sequences into free slots. A new batch (none live) is the oldest waiting sequence's group:
        every waiting sequence of that group joins, wherever it stands in the queue. A running batch takes
        more of its group only while no other group waits; otherwise it drains and that group runs next."""
        admitted = False
        forming, group = not self.live, _NO_GROUP
        while len(self.live) < self.slots:
            with self.lock:
                if not self.waiting:
                    break
                if forming:
                    group = self.waiting[0].group if group is _NO_GROUP else group
                    seq = next((s for s in self.waiting if s.group == group), None)
                    if seq is None:
                        break
                elif any(s.group != self._group for s in self.waiting):
                    break  # another group waits: this batch drains, then that group's turn
                else:
                    seq = self.waiting[0]
                self.waiting.remove(seq)
            if seq.cancelled:
                self._end(seq, "cancelled")
                continue
            self._switch(seq.group)
            try:
                self._prefill(seq)
            except Exception as exc:  # this prompt alone fails (the cache is untouched until it is stored)
                seq.error = f"{type(exc).__name__}: {exc}"
                self._end(seq, "error")
                continue
            admitted = True
        return admitted

    def _run_tasks(self) -> None:
        with self.lock:
            busy = {s.group for s in self.live} | {s.group for s in self.waiting}
            ready = [t for t in self.tasks if t[1] is None or t[1] not in busy]
            self.tasks = [t for t in self.tasks if t not in ready]
        for fn, _, future in ready:
            running = self._group
            self._group_context.close()  # the task sees the model as loaded, no adapter selected
            self._group = _NO_GROUP
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller's to report; the engine goes on
                future.set_exception(exc)
            if self.live:
                self._switch(running)

    def _switch(self, group) -> None:
        if group == self._group or self.select is None:
            self._group = group
            return
        self._group_context.close()
        self._group_context = contextlib.ExitStack()
        self._group_context.enter_context(self.select(group))
        self._group = group

    def _prefill(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        self.cache.ensure(len(seq.prompt) + 1)
        slot = len(self.live)
        fast = self._bf16_decoder()
        if fast is not None:
            logits = fast.prefill(seq.prompt, self.cache.keys, self.cache.values, slot)
        else:
            ids = torch.tensor([seq.prompt], device=self.device)
            out = self.model(
                input_ids=ids, cache=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1
            )
            self.cache.store(slot, [(layer.keys, layer.values) for layer in out.cache.layers])
            logits = out.logits[0, -1]
        self.live.append(seq)
        self._take(seq, logits)

    def _bf16_decoder(self) -> Bf16Decoder | None:
        """The running group's bf16 decoder (made now, under the group's `select`, the first time); None in
        float32 or where the model is not one decode.py runs (transformers' forward then)."""
        if self.precision != "bf16":
            return None
        if self._group not in self._decoders:
            self._decoders[self._group] = decoder_for(self.model)
        return self._decoders[self._group]

    def prepare(self, group: str | None) -> None:
        """Make `group`'s bf16 decoder now, so that its first request does not wait for it; call from the
        engine's thread (`call`), where no group is selected."""
        if self.precision == "bf16" and group not in self._decoders:
            with self.select(group) if self.select is not None else contextlib.nullcontext():
                self._decoders[group] = decoder_for(self.model)

    def forget(self, group: str | None) -> None:
        """Drop `group`'s bf16 decoder (its adapter was removed); call from the engine's thread (`call`)."""
        self._decoders.pop(group, None)

    def _decode(self) -> None:
        live = self.live
        positions = torch.tensor([s.length - 1 for s in live], device=self.device)  # the last token's
        width = int(positions.max()) + 1
        self.cache.ensure(width)
        tokens = torch.tensor([s.tokens[-1] for s in live], device=self.device)
        fast = self._bf16_decoder()
        if fast is not None:
            logits = fast.step(tokens, positions, self.cache.keys, self.cache.values)
        else:
            self.cache.begin(positions, width)
            mask = torch.arange(width, device=self.device)[None, :] <= positions[:, None]
            logits = self.model(
                input_ids=tokens[:, None],
                position_ids=positions[:, None],
                attention_mask=mask[:, None, None, :],
                cache=self.cache,
                use_cache=True,
            ).logits[:, -1]
        for seq, row in zip(list(live), logits):
            self._take(seq, row)

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample `seq`'s next token from its logits, hand it on, and end the sequence where it stops."""
        logits = logits.float()
        if seq.sampling.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt + seq.tokens, device=logits.device)
            logits = penalize(logits, seen, seq.sampling.repetition_penalty)
        token = choose(logits, seq.sampling, seq.generator)
        if token in self.stop_ids:
            seq.stop_token = token
            return self._end(seq, "stop")
        seq.tokens.append(token)
        ended = seq.on_token(token) if seq.on_token is not None else None
        if ended:  # the consumer's word: "stop" (its own stop string) or "cancelled"
            return self._end(seq, ended)
        if seq.sampling.stop and self.decode_text is not None and self._hit_stop_string(seq):
            return self._end(seq, "stop")
        if len(seq.tokens) >= seq.sampling.max_new_tokens or seq.length >= self.context:
            self._end(seq, "length")

    def _hit_stop_string(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.sampling.stop)
        tail = self.decode_text(seq.tokens[-(longest + 8) :])
        return any(s in tail for s in seq.sampling.stop)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.live if s.cancelled]:
            self._end(seq, "cancelled")

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish = reason
        if seq in self.live:
            index, last = self.live.index(seq), len(self.live) - 1
            if index != last:  # keep live rows in slots 0..B-1: the last one moves into the freed slot
                self.cache.move(last, index, self.live[last].length)
                self.live[index] = self.live[last]
            self.live.pop()
        if seq.on_end is not None:
            seq.on_end(seq)
        seq.done.set()
