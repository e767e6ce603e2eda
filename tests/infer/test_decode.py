"""The bf16 decode step (infer/decode.py) against transformers' float32 forward on tiny random models: each
row's logits at its own position match within bf16 rounding, alone and batched (rows at different positions,
past the first rows of the cache); q/k/v biases (Qwen2) are applied; an active unmerged adapter is refused and
a merged one is not; the engine in bf16 streams what it returns."""

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


def _bf16_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    """Each sequence's last-token logits from the bf16 step, its earlier tokens prefilled in float32."""
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
    return Bf16Decoder(model).step(tokens, positions, cache.keys, cache.values)


def _float32_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_step_matches_float32_forward_alone_and_batched(kind):
    model = _model(kind)
    torch.manual_seed(1)
    sequences = [torch.randint(0, 300, (n,)).tolist() for n in (5, 13, 2, 9)]  # 13 > the cache's first 8
    want = _float32_logits(model, sequences)
    for rows in ([sequences[0]], sequences[:2], sequences):  # 1 and 2 rows: torch's kernel; 4: oneDNN's
        got = _bf16_logits(model, rows)
        scale = want[: len(rows)].abs().max()
        assert (got - want[: len(rows)]).abs().max() < 0.03 * scale, rows
        assert torch.equal(got.argmax(-1), want[: len(rows)].argmax(-1))


def test_a_cache_or_position_error_would_show():
    """The tolerance above is tight enough: the step at a wrong position is far off."""
    model = _model("llama")
    seq = torch.randint(0, 300, (9,)).tolist()
    want = _float32_logits(model, [seq])
    shifted = _bf16_logits(model, [seq[1:]])  # the same last token one position earlier, a shorter context
    assert (shifted - want).abs().max() > 0.1 * want.abs().max()


def test_unmerged_active_adapter_is_refused_merged_is_not():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert unsupported(model) == "an unmerged adapter is active"
    model.merge_adapter()
    assert unsupported(model) is None
    model.unmerge_adapter()
    with model.disable_adapter():
        assert unsupported(model) is None
    assert "model type" in unsupported(_gpt2())


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))


def test_engine_in_bf16_streams_its_tokens():
    model = _model("llama")
    engine = Engine(model, stop_ids=[], slots=4, precision="bf16")
    seen: list[int] = []
    (seq,) = engine.generate([[1, 2, 3]], Sampling(max_new_tokens=6), on_token=seen.append)
    assert isinstance(engine._fast, Bf16Decoder) and seq.tokens == seen and len(seen) == 6


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
