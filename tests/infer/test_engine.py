"""The generation engine (infer/engine.py) on the tiny random Llama in float32: greedy output equal to
`generate`'s, alone and in a batch (a prompt longer than the cache's first capacity included); sequences with
different settings in one batch each get what they get alone; cancelling frees the slot for a waiting
sequence; stop strings end a sequence; the background loop streams."""

from __future__ import annotations

import pytest

from llama_lora.infer import generate, loading
from llama_lora.infer.engine import Engine
from llama_lora.infer.sampling import Sampling


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    """A tiny Llama with large random weights: unlike the usual tiny model (std 0.02, whose greedy choice hardly
    depends on the context) its next token depends on every position, so a cache or position error shows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_SHAPE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        initializer_range=0.5,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("lively-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return loading.load(base=str(path), device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def prompts(loaded):
    words = ["one", "two words here", "a somewhat longer request about the weather today", "hi"]
    made = [generate.render_prompt(loaded, [{"role": "user", "content": w}]) for w in words]
    made.append(made[2] * 12)  # past the cache's first capacity (256 positions): it must grow
    assert len(made[-1]) > 256
    return made


def _engine(loaded, slots=8) -> Engine:
    return Engine(loaded.model, loaded.stop_ids, slots=slots, decode=loaded.tokenizer.decode)


def test_greedy_output_equals_generate_alone_and_batched(loaded, prompts):
    """Different lengths end at different steps, so finished rows leave mid-batch and others move slots."""
    lengths = [8, 20, 12, 20, 16]
    want = [
        generate.generate_ids(loaded, p, generate.GenerationSettings(max_new_tokens=n)).token_ids
        for p, n in zip(prompts, lengths)
    ]
    engine = _engine(loaded)
    settings = [Sampling(max_new_tokens=n) for n in lengths]
    alone = [engine.generate([p], s)[0].tokens for p, s in zip(prompts, settings)]
    together = [s.tokens for s in engine.generate(prompts, settings)]
    assert alone == want
    assert together == want
    assert [len(t) for t in want] == lengths  # no early stop: every row ran its length
    assert engine.live == [] and engine.cache.capacity >= len(prompts[-1]) + 1


def test_settings_in_one_batch_each_get_what_they_get_alone(loaded, prompts):
    settings = [
        Sampling(max_new_tokens=12, repetition_penalty=1.3),
        Sampling(max_new_tokens=12, greedy=False, temperature=0.8, top_p=0.9, top_k=20, seed=1),
        Sampling(max_new_tokens=5, greedy=False, temperature=1.2, top_p=1.0, top_k=0, seed=2),
        Sampling(max_new_tokens=12, greedy=False, temperature=1.2, top_p=1.0, top_k=0, seed=3),
    ]
    engine = _engine(loaded)
    alone = [engine.generate([p], s)[0].tokens for p, s in zip(prompts, settings)]
    together = [s.tokens for s in engine.generate(prompts[:4], settings)]
    assert together == alone
    assert len(alone[2]) <= 5
    reseeded = Sampling(**{**settings[3].__dict__, "seed": 4})
    assert engine.generate([prompts[3]], reseeded)[0].tokens != alone[3]  # the seed is what decides


def test_cancelling_frees_the_slot_for_a_waiting_sequence(loaded, prompts):
    engine = _engine(loaded, slots=1)
    endless = Sampling(max_new_tokens=10_000)
    first = engine.submit(prompts[0], endless)
    second = engine.submit(prompts[1], Sampling(max_new_tokens=8))
    for _ in range(5):
        engine.step()
    assert engine.live == [first] and not second.done.is_set()  # one slot: the second waits
    first.cancel()
    while not second.done.is_set():
        engine.step()
    assert first.finish == "cancelled" and first.done.is_set() and 0 < len(first.tokens) < 10
    assert second.tokens == _engine(loaded).generate([prompts[1]], Sampling(max_new_tokens=8))[0].tokens


def test_a_stop_string_ends_the_sequence(loaded, prompts):
    engine = _engine(loaded)
    full = engine.generate([prompts[2]], Sampling(max_new_tokens=20))[0]
    assert len(full.tokens) >= 6, "the tiny model stopped too early for this test"
    stop = loaded.tokenizer.decode(full.tokens[3:5])
    cut = engine.generate([prompts[2]], Sampling(max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish == "stop" and cut.tokens == full.tokens[: len(cut.tokens)]
    assert stop in loaded.tokenizer.decode(cut.tokens) and len(cut.tokens) <= 5


def test_the_background_loop_streams_each_token(loaded, prompts):
    engine = _engine(loaded)
    want = engine.generate([prompts[1]], Sampling(max_new_tokens=10))[0].tokens
    engine.start()
    try:
        assert list(engine.stream(prompts[1], Sampling(max_new_tokens=10))) == want
    finally:
        engine.stop()


def test_a_prompt_past_the_context_is_refused(loaded):
    engine = Engine(loaded.model, loaded.stop_ids, context=8)
    with pytest.raises(ValueError, match="context"):
        engine.submit(list(range(8)), Sampling())
