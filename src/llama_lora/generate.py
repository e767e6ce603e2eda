"""Inference: load base / base + adapter / merged model, render prompts like training did, generate.

The prompt template comes from the run that trained the adapter (`config.yaml` in the run directory, or
`llama_lora.json` inside the adapter or merged directory), so training and inference never disagree.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_lora import adapters, data, models
from llama_lora.batching import collate, pad_id_for
from llama_lora.config import Config, ModelConfig, load_config
from llama_lora.errors import LlamaLoraError
from llama_lora.meta import fingerprint_matches, read_meta


class InferenceError(LlamaLoraError):
    pass


@dataclass
class AdapterSource:
    adapter_dir: Path
    run_dir: Path | None
    cfg: Config | None
    template: str | None
    fingerprint: dict[str, Any] | None
    base_name: str


def find_adapter(path: str | Path) -> AdapterSource:
    """A run directory (with adapter/) or an adapter directory (with adapter_config.json)."""
    path = Path(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        run, adapter = path, path / "adapter"
    elif (path / "adapter_config.json").is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        adapter = path
    else:
        raise InferenceError(
            f"--adapter: {path} is neither a run directory nor an adapter directory (no adapter_config.json)"
        )
    meta = read_meta(adapter) or {}
    cfg = (
        load_config(run / "config.yaml")
        if run is not None
        else (Config.model_validate(meta["config"]) if "config" in meta else None)
    )
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = cfg.model.name if cfg is not None else adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise InferenceError(
            f"--adapter: {adapter} does not say which base model it was trained for; pass --base"
        )
    return AdapterSource(adapter, run, cfg, meta.get("template"), meta.get("base_fingerprint"), base)


# ------------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: str
    system_prompt: str | None
    device: str
    description: str
    source: AdapterSource | None = None
    stop_ids: list[int] = field(default_factory=list)
    stored_dtype: str = "float32"  # dtype of the base weights on disk
    tools: list[dict[str, Any]] | None = None  # --tools schemas, rendered as training renders them


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS plus the end-of-turn tokens the chat template uses: generation stops at any of them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in data.END_OF_TURN:
        if token in template:
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return sorted(i for i in ids if i is not None)


def load(
    base: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    template: str | None = None,
    trust_remote_code: bool = False,
    merge_in_memory: bool = True,
    log=print,
) -> Loaded:
    """Base alone (`base`), base + adapter (`adapter`, base from its run unless `base` overrides),
    or a merged model directory (`base`).

    With `merge_in_memory` the adapter is folded into the weights in place (reversibly, PEFT's
    `merge_adapter`): generation then costs what the base model costs, instead of PEFT's DoRA recomputing
    every weight norm for every generated token (much slower on CPU, measured: bench/RESULTS.md)."""
    if base is None and adapter is None:
        raise InferenceError("give --adapter RUN_DIR (or an adapter directory) or --base MODEL")
    src = find_adapter(adapter) if adapter else None
    name = base or (src.base_name if src else None)
    assert name is not None
    dev = models.resolve_device(device)
    mcfg = ModelConfig(name=name, trust_remote_code=trust_remote_code)
    if src is not None and src.cfg is not None and base is None:
        mcfg = src.cfg.model
    ref = models.resolve(mcfg.name)
    tokenizer = models.load_tokenizer(mcfg, ref)
    stored = models.stored_dtype(mcfg, ref)
    model = models.load_model(mcfg, torch.float32, ref)
    merged_meta = read_meta(Path(models.local_path(ref, log=log))) if ref.kind == "local" else None
    cfg = src.cfg if src else (Config.model_validate(merged_meta["config"]) if merged_meta else None)
    description = mcfg.name
    if src is not None:
        models.refuse_pickled(src.adapter_dir, mcfg.allow_pickle, key="--adapter")
        if src.fingerprint is not None and not fingerprint_matches(src.fingerprint, model):
            raise InferenceError(
                f"--adapter: {src.adapter_dir} was trained for a different base model than {mcfg.name} "
                f"(trained on {src.base_name}; shapes or weights differ). Use that base or drop --base."
            )
        try:
            model = adapters.load_adapter(model, src.adapter_dir)
        except RuntimeError as exc:  # size mismatch: an adapter made for another architecture
            raise InferenceError(
                f"--adapter: {src.adapter_dir} does not fit {mcfg.name}: {str(exc).splitlines()[0]}"
            ) from None
        if merge_in_memory:
            model.merge_adapter()
        description = f"{mcfg.name} + adapter {src.adapter_dir}"
    chosen = (
        template
        or (src.template if src and src.template else None)
        or (merged_meta.get("template") if merged_meta else None)
    )
    if chosen is None and cfg is not None:
        chosen = cfg.data.template
    chosen = data.choose_template(tokenizer, chosen or "auto")
    model.to(dev).eval()
    system = cfg.data.system_prompt if cfg is not None else None
    return Loaded(
        model, tokenizer, chosen, system, dev, description, src, stop_token_ids(tokenizer, model), stored
    )


# ---------------------------------------------------------------------------------------- generating


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = 0

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


def render_prompt(loaded: Loaded, messages: list[data.Message]) -> list[int]:
    """Token ids of the prompt, produced exactly as training produced the prompt part of a row."""
    if loaded.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": loaded.system_prompt}, *messages]
    text = data.prompt_text(messages, loaded.tokenizer, loaded.template, loaded.tools)
    return data.tokenize([(text, False)], loaded.tokenizer).input_ids


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    stopped: bool  # ended on an end-of-turn/EOS token (not cut by max_new_tokens)


class _PrintStreamer:
    """Prints decoded text as tokens arrive (the same decoding as the final text, so outputs agree)."""

    def __init__(self, tokenizer, stop_ids: list[int], write):
        self.tokenizer, self.stop_ids, self.write = tokenizer, set(stop_ids), write
        self.ids: list[int] = []
        self.shown = ""
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate() passes the prompt first
            self.first = False
            return
        self.ids.extend(int(t) for t in value.reshape(-1) if int(t) not in self.stop_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return
        self.write(text[len(self.shown) :])
        self.shown = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.write(text[len(self.shown) :])
        self.shown = text


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
    loaded: Loaded, messages: list[data.Message], settings: GenerationSettings, stream=None, should_stop=None
) -> Generation:
    """Generate a reply to `messages`. `stream(text)` receives text pieces as they are produced;
    `should_stop()`, asked after every token, ends generation early when it returns True."""
    return generate_ids(loaded, render_prompt(loaded, messages), settings, stream, should_stop)


@torch.no_grad()
def generate_ids(
    loaded: Loaded, ids: list[int], settings: GenerationSettings, stream=None, should_stop=None
) -> Generation:
    """`generate` on a prompt that is already token ids (`serve`'s plain completions use it too)."""
    limit = check_context(loaded, ids)
    max_new = settings.max_new_tokens if limit is None else min(settings.max_new_tokens, limit - len(ids))
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


@torch.no_grad()
def generate_many(
    loaded: Loaded, conversations: list[list[data.Message]], settings: GenerationSettings, batch_size: int = 8
) -> list[Generation]:
    """Greedy/sampled replies for many prompts, left-padded into batches (generation on CPU is dominated
    by per-step overhead, so a batch of 8 costs little more than one prompt)."""
    prompts = [render_prompt(loaded, m) for m in conversations]
    limit = context_length(loaded.model)
    for ids in prompts:
        if limit is not None and len(ids) + settings.max_new_tokens > limit:
            raise InferenceError(
                f"a prompt is {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                f"it exceeds the model's context of {limit}"
            )
    pad = _pad_id(loaded)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    results: dict[int, Generation] = {}
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate(
            [data.Example(prompts[i], [data.IGNORE] * len(prompts[i])) for i in chunk], pad, "left"
        )
        width = batch["input_ids"].shape[1]
        out = loaded.model.generate(
            input_ids=batch["input_ids"].to(loaded.device),
            attention_mask=batch["attention_mask"].to(loaded.device),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=loaded.stop_ids,
            pad_token_id=pad,
            **settings.kwargs(),
        )
        for row, i in enumerate(chunk):
            results[i] = _finish(loaded, out[row, width:].tolist(), len(prompts[i]))
    return [results[i] for i in range(len(prompts))]


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


def stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def prompt_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a prompts file, in any training data format."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"--prompts-file: {path} not found")
    try:
        return data.load_rows(str(p), "train")
    except LlamaLoraError as exc:
        raise InferenceError(f"--prompts-file: {exc}") from None


def row_prompt(row: dict[str, Any]) -> tuple[list[data.Message], str | None]:
    fmt = data.detect_format(row)
    if fmt == "text":
        raise InferenceError("--prompts-file: plain-text rows have no prompt/response split")
    messages = data.to_messages(row, fmt)
    reference = data.reference_answer(messages)
    if reference is not None:
        messages = messages[:-1]
    return messages, reference


def generate_rows(
    loaded: Loaded, rows: list[dict[str, Any]], settings: GenerationSettings, sink, where: str
) -> int:
    """`infer --prompts-file`: one JSON line per row on `sink` (prompt, generation, stopped, and the
    reference answer when the row has one), flushed as it goes. Returns the number written."""
    for i, row in enumerate(rows):
        try:
            messages, reference = row_prompt(row)
        except (ValueError, LlamaLoraError) as exc:
            raise InferenceError(f"{where}: row {i}: {exc}") from None
        result = generate(loaded, messages, settings)
        record = {"prompt": messages[-1]["content"], "generation": result.text, "stopped": result.stopped}
        if reference is not None:
            record["reference"] = reference
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()
    return len(rows)


def chat_session(loaded: Loaded, settings: GenerationSettings, read, note) -> None:
    """`llama-lora chat`: read a line (`read()`, EOFError ends), answer it streamed to stdout, keep the
    history; `/reset` clears it, `/exit` or `/quit` ends. An error (e.g. the conversation outgrew the
    context) is a `note` and the session goes on without that turn."""
    history: list[data.Message] = []
    while True:
        try:
            text = read().strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            note("(history cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        try:
            reply = generate(loaded, history, settings, stream=stdout_writer)
        except LlamaLoraError as exc:
            history.pop()
            note(f"\nerror: {exc} (use /reset)")
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply.text})
