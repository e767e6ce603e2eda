"""GGUF export on the tiny Llama: f16 and q8_0 round trips through transformers, errors, the Modelfile."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from llama_lora.export import gguf_model, verify
from llama_lora.export.gguf_meta import ExportError, modelfile
from tests.conftest import run_cli


def quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """Both types exported once: {type: (report, gguf path)}."""
    out = {}
    for kind in ("f16", "q8_0"):
        path = tmp_path_factory.mktemp(f"gguf-{kind}") / "model.gguf"
        out[kind] = (gguf_model.export_gguf(tiny_model_dir, path, kind, new_tokens=8, log=quiet), path)
    return out


def test_f16_round_trip(exported):
    report, path = exported["f16"]
    assert report["passed"] and report["tokenizer_round_trip"]
    assert report["relative_logit_diff"] <= verify.F16_REL_TOLERANCE
    assert report["greedy_token_agreement"] == 1.0
    assert json.loads((path.parent / "export_report.json").read_text())["max_abs_logit_diff"] < 0.05
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "export_report.json", "model.gguf"]

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "F16" and types["blk.1.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()


def test_q8_0_is_smaller_and_agreement_is_reported(exported):
    report, path = exported["q8_0"]
    assert report["passed"] and report["tokenizer_round_trip"]
    assert 0.0 <= report["greedy_token_agreement"] <= 1.0
    assert report["max_abs_logit_diff"] >= exported["f16"][0]["max_abs_logit_diff"]
    assert path.stat().st_size < 0.7 * exported["f16"][1].stat().st_size
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_norm.weight"] == "F32"


def test_modelfile_chatml(exported):
    text = (exported["f16"][1].parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text


def test_modelfile_llama3_and_unknown_templates(tokenizer):
    llama3 = (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    )
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = llama3
    text, style = modelfile("m.gguf", tok)
    assert style == "llama3" and 'PARAMETER stop "<|eot_id|>"' in text and "SYSTEM" not in text
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text, style = modelfile("m.gguf", tok)
    assert style is None and text == "FROM ./m.gguf\n"


def test_permute_matches_the_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(gguf_model.permute(w, 8), 8, 8)
    assert np.array_equal(back, w)


def test_failed_check_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    failed = {"tokenizer_round_trip": True, "tokenizer_mismatches": [], "max_abs_logit_diff": 9.0}
    failed |= {"relative_logit_diff": 0.5, "greedy_token_agreement": 0.1, "tolerance": "...", "passed": False}
    monkeypatch.setattr(gguf_model, "check_gguf", lambda *args, **kwargs: failed)  # the real check runs above
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(verify.ExportCheckError, match="nothing written"):
        gguf_model.export_gguf(tiny_model_dir, target, "f16", log=quiet)
    assert sorted(p.name for p in target.parent.iterdir()) == ["export_report.json"]
    assert json.loads((target.parent / "export_report.json").read_text())["passed"] is False


def test_run_dir_without_merged_model(tmp_path, tiny_model_dir):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ExportError, match=f"run `llama-lora merge {tmp_path}` first"):
        gguf_model.source_dir(tmp_path)
    (tmp_path / "merged").symlink_to(tiny_model_dir)
    assert gguf_model.source_dir(tmp_path) == tmp_path / "merged"


def test_other_architectures_are_refused(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, architectures=["Qwen2ForCausalLM"]
    ).save_pretrained(tmp_path)
    result = run_cli("export", "gguf", str(tmp_path), "--out", str(tmp_path / "m.gguf"))
    assert result.returncode == 2, result.stderr
    assert "not supported" in result.stderr and "Qwen2ForCausalLM" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf"))


def test_llama3_rope_factors_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=16384, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (5e5 ** (torch.arange(0, 32, 2).float() / 32))
    factors = gguf_model.llama3_rope_factors(32, gguf_model.rope_parameters(config))
    assert np.allclose(factors, (plain / scaled).numpy(), rtol=1e-4)
    assert factors.min() == 1.0 and factors.max() == 32.0


def test_a_directory_that_is_no_model_is_one_line(tmp_path):
    from tests.conftest import cli_in_process

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code, _, err = cli_in_process("export", "gguf", str(broken), "--out", str(tmp_path / "m.gguf"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a loadable model directory" in err, err
    assert not list(tmp_path.glob("*.gguf"))
