"""The bf16 decode step (infer/decode.py) against transformers' float32 forward on tiny random models: each
row's logits at its own position match within bf16 rounding, alone and batched (rows at different positions,
past the first rows of the cache); q/k/v biases (Qwen2) are applied; an active unmerged LoRA or DoRA adapter
is folded into the bf16 copies (as merging would, the model untouched); the engine in bf16 streams what it
returns and decodes each adapter group with that adapter's copies."""

from __future__ import annotations

import pytest
import torch

from llama_lora.infer.decode import Bf16Decoder, unsupported
from llama_lora.infer.engine import Engine
from llama_lora.infer.sampling import Sampling
from llama_lora.infer.slot_cache import SlotCache
from tests.conftest import TINY_SHAPE


def _model(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v with biases, untied head
        config = Qwen2Config(vocab_size=300, **TINY_SHAPE, initializer_range=0.3, tie_word_embeddings=False)
        model = Qwen2ForCausalLM(config)
        for layer in model.model.layers:  # non-zero biases, so a missing one shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
        return model.eval()
    config = LlamaConfig(vocab_size=300, **TINY_SHAPE, initializer_range=0.3, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _bf16_logits(model, sequences: list[list[int]], compiled: bool = True) -> torch.Tensor:
    """Each sequence's last-token logits from the bf16 step, its earlier tokens prefilled in float32; one row
    runs the compiled step (decode_native) unless `compiled` is False."""
    from transformers import DynamicCache

    cache = SlotCache(model.config, len(sequences), torch.float32, "cpu", capacity=8)
    cache.ensure(max(len(s) for s in sequences))
    with torch.no_grad():
        for slot, seq in enumerate(sequences):
            out = model(
                input_ids=torch.tensor([seq[:-1]]), cache=DynamicCache(config=model.config), use_cache=True
            )
            cache.store(slot, [(layer.keys, layer.values) for layer in out.cache.layers])
    tokens = torch.tensor([s[-1] for s in sequences])
    positions = torch.tensor([len(s) - 1 for s in sequences])
    decoder = Bf16Decoder(model)
    if not compiled:
        decoder._native = False
    elif len(sequences) == 1:
        assert decoder._compiled() is not None  # built here (CI has a compiler): the path under test
    return decoder.step(tokens, positions, cache.keys, cache.values)


def _float32_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_step_matches_float32_forward_alone_and_batched(kind):
    model = _model(kind)
    torch.manual_seed(1)
    sequences = [torch.randint(0, 300, (n,)).tolist() for n in (5, 13, 2, 9)]  # 13 > the cache's first 8
    want = _float32_logits(model, sequences)
    # 1 row: the compiled step and the Python one; 1 and 2 rows: torch's kernel; 4: oneDNN's packed weights
    for rows, compiled in (
        ([sequences[0]], True),
        ([sequences[0]], False),
        (sequences[:2], True),
        (sequences, True),
    ):
        got = _bf16_logits(model, rows, compiled)
        scale = want[: len(rows)].abs().max()
        assert (got - want[: len(rows)]).abs().max() < 0.03 * scale, (rows, compiled)
        assert torch.equal(got.argmax(-1), want[: len(rows)].argmax(-1))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_cache_or_position_error_would_show(compiled):
    """The tolerance above is tight enough: the step at a wrong position is far off."""
    model = _model("llama")
    seq = torch.randint(0, 300, (9,)).tolist()
    want = _float32_logits(model, [seq])
    shifted = _bf16_logits(model, [seq[1:]], compiled)  # the same last token one position earlier
    assert (shifted - want).abs().max() > 0.1 * want.abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_compiled_step_writes_the_cache_as_the_python_step_does(kind):
    """Same keys and values at the new position of the same slot, nothing else touched, logits alike; and
    without the compiled module (no compiler here) the Python step runs."""
    from llama_lora.infer import decode_native

    model = _model(kind)
    torch.manual_seed(3)
    caches = [SlotCache(model.config, 3, torch.float32, "cpu", capacity=16) for _ in range(2)]
    caches[0].keys.normal_(), caches[0].values.normal_()
    caches[1].keys.copy_(caches[0].keys), caches[1].values.copy_(caches[0].values)
    token, position = torch.tensor([7]), torch.tensor([11])
    logits = []
    for cache, compiled in zip(caches, (True, False)):
        decoder = Bf16Decoder(model)
        decoder._native = None if compiled else False
        logits.append(decoder.step(token, position, cache.keys, cache.values))
    assert (logits[0] - logits[1]).abs().max() < 0.02 * logits[1].abs().max()
    for got, want in ((caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)):
        assert (got[:, 0, :, 11] - want[:, 0, :, 11]).abs().max() < 0.02 * want[:, 0, :, 11].abs().max()
        got[:, 0, :, 11], want[:, 0, :, 11] = 0, 0
        assert torch.equal(got, want)
    decoder = Bf16Decoder(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_native, "_module", False)
        assert decoder._compiled() is None and decoder._native is False


def _with_adapters(use_dora: bool):
    """The llama model with two PEFT adapters, "a" and "b", whose terms are not zero (B initialised too)."""
    from peft import LoraConfig, get_peft_model

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)
    model = get_peft_model(_model("llama"), LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", LoraConfig(**config))
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_magnitude" in name:
            param.data += 0.3 * torch.randn_like(param)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_an_active_adapter_is_folded_into_the_copies_and_the_model_left_as_it_was(use_dora):
    model = _with_adapters(use_dora)
    seq = torch.randint(0, 300, (7,)).tolist()
    for adapter in ("a", "b"):
        model.set_adapter(adapter)
        assert unsupported(model) is None
        want = _float32_logits(model, [seq])  # PEFT's forward with the adapter's terms unmerged
        before = {k: v.clone() for k, v in model.state_dict().items()}
        got = _bf16_logits(model, [seq])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert (got - want).abs().max() < 0.03 * want.abs().max() and torch.equal(
            got.argmax(-1), want.argmax(-1)
        )
        model.merge_adapter([adapter])
        merged = Bf16Decoder(model)
        model.unmerge_adapter()
        folded = Bf16Decoder(model)
        assert all(torch.equal(f[2].weight, m[2].weight) for f, m in zip(folded.layers, merged.layers))
    with model.disable_adapter():
        base = _float32_logits(model, [seq])
        assert (_bf16_logits(model, [seq]) - base).abs().max() < 0.04 * base.abs().max()
    assert (base - want).abs().max() > 0.1 * base.abs().max()  # the adapters do change the logits
    assert "model type" in unsupported(_gpt2())


def test_the_engine_decodes_each_group_with_its_own_adapter_folded_in():
    from llama_lora.model.adapters import use_adapter

    model = _with_adapters(use_dora=True)
    prompt, sampling = [5, 6, 7, 8], Sampling(max_new_tokens=8)
    engine = Engine(model, [], slots=4, precision="bf16", select=lambda g: use_adapter(model, g))
    seqs = [engine.submit(prompt, sampling, group=g) for g in ("a", None, "b", "a")]
    engine.step()
    assert engine.live == [seqs[0], seqs[3]]  # a new batch takes every waiting sequence of its group
    late = engine.submit(prompt, sampling, group="a")
    engine.step()
    assert late not in engine.live  # but a running one takes no more while other groups wait
    seqs.append(late)
    while not all(s.done.is_set() for s in seqs):
        engine.step()
    assert set(engine._decoders) == {"a", None, "b"}
    alone = {}
    for group in ("a", None, "b"):
        with use_adapter(model, group):
            (seq,) = Engine(model, [], slots=1, precision="bf16").generate([prompt], sampling)
            alone[group] = seq.tokens
    assert [s.tokens for s in seqs] == [alone["a"], alone[None], alone["b"], alone["a"], alone["a"]]
    assert alone["a"] != alone["b"] or alone["a"] != alone[None]
    engine.forget("b")
    assert set(engine._decoders) == {"a", None}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))


def test_engine_in_bf16_streams_its_tokens():
    model = _model("llama")
    engine = Engine(model, stop_ids=[], slots=4, precision="bf16")
    seen: list[int] = []
    (seq,) = engine.generate([[1, 2, 3]], Sampling(max_new_tokens=6), on_token=seen.append)
    assert isinstance(engine._decoders[None], Bf16Decoder) and seq.tokens == seen and len(seen) == 6


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_prefill_matches_float32_forward_and_its_cache(kind):
    from transformers import DynamicCache

    model = _model(kind)
    prompt = torch.randint(0, 300, (11,)).tolist()
    cache = SlotCache(model.config, 2, torch.float32, "cpu", capacity=16)
    logits = Bf16Decoder(model).prefill(prompt, cache.keys, cache.values, slot=1)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), cache=DynamicCache(config=model.config), use_cache=True)
    want = out.logits[0, -1]
    assert (logits - want).abs().max() < 0.03 * want.abs().max() and logits.argmax() == want.argmax()
    for layer, kv in enumerate(out.cache.layers):
        stored = cache.keys[layer, 1, :, :11], cache.values[layer, 1, :, :11]
        for got, ref in zip(stored, (kv.keys[0], kv.values[0])):
            assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    assert cache.keys[:, 0].abs().max() == 0  # the other slot untouched
