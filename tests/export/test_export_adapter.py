"""`export gguf-adapter` on a tiny trained LoRA run: llama.cpp's adapter format, the check, refusals."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from llama_lora.config import load_config
from llama_lora.export import gguf_adapter, gguf_model, verify
from llama_lora.export.gguf_meta import ExportError
from llama_lora.train.loop import train
from tests.conftest import cli_in_process, tiny_overrides


def quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A LoRA run trained hard enough to move the output, and a one-step DoRA run."""
    root = tmp_path_factory.mktemp("adapter-runs")
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 2)))}
        for i in range(30)
    ]
    source = root / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = {}
    for method, steps in (("lora", 8), ("dora", 1)):
        extra = {"peft.use_dora": method == "dora", "train.max_steps": steps, "train.learning_rate": 5e-3}
        train(
            load_config(overrides=tiny_overrides(tiny_model_dir, source, root / method, **extra)), quiet=True
        )
        made[method] = root / method
    return made


@pytest.fixture(scope="module")
def strong_qk(runs, tmp_path_factory):
    """The LoRA run with q/k lora_B scaled by 20. The tiny random model's attention is nearly uniform, so the
    trained q/k deltas barely move its logits (a q/k permutation error there stays under the tolerance);
    scaled up, they do, and a wrong permutation shows."""
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("strong") / "lora"
    shutil.copytree(runs["lora"], run, ignore=shutil.ignore_patterns("gguf-adapter"))
    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    for key in tensors:
        if "lora_B" in key and ("q_proj" in key or "k_proj" in key):
            tensors[key] = tensors[key] * 20
    save_file(tensors, path, metadata={"format": "pt"})
    return run


@pytest.fixture(scope="module")
def exported(runs):
    """The LoRA run exported once with its base: (report, adapter path)."""
    report = gguf_adapter.export_gguf_adapter(runs["lora"], log=quiet)
    return report, runs["lora"] / "gguf-adapter" / "adapter.gguf"


def test_adapter_file_is_llama_cpp_lora_format(runs, exported):
    _, path = exported
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["general.architecture"].contents() == "llama"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0  # r 4, lora_alpha 8: llama.cpp's alpha / r = 2
    data = {t.name: np.array(t.data) for t in reader.tensors}
    projections = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in projections for ab in "ab"}
    assert set(data) == expected
    assert data["blk.0.attn_q.weight.lora_a"].shape == (4, 64)  # (r, in)
    assert data["blk.0.attn_q.weight.lora_b"].shape == (64, 4)  # (out, r)
    assert data["blk.1.attn_k.weight.lora_b"].shape == (32, 4)  # 2 key-value heads of 16
    assert data["blk.0.ffn_down.weight.lora_a"].shape == (4, 128)

    peft = load_file(runs["lora"] / "adapter" / "adapter_model.safetensors")
    layer = "base_model.model.model.layers.1.self_attn"
    b_q, b_k = peft[f"{layer}.q_proj.lora_B.weight"].numpy(), peft[f"{layer}.k_proj.lora_B.weight"].numpy()
    assert np.array_equal(data["blk.1.attn_q.weight.lora_b"], gguf_model.permute(b_q, 4))
    assert np.array_equal(data["blk.1.attn_k.weight.lora_b"], gguf_model.permute(b_k, 2))
    assert not np.array_equal(data["blk.1.attn_q.weight.lora_b"], b_q)  # the permutation does move rows
    assert np.array_equal(data["blk.1.attn_v.weight.lora_b"], peft[f"{layer}.v_proj.lora_B.weight"].numpy())
    assert np.array_equal(data["blk.1.attn_q.weight.lora_a"], peft[f"{layer}.q_proj.lora_A.weight"].numpy())


def test_adapter_applied_to_the_base_gguf_matches_the_adapter(runs, exported):
    report, path = exported
    assert report["passed"] and report["tokenizer_round_trip"] and report["base_written"]
    assert report["relative_logit_diff"] <= verify.F16_REL_TOLERANCE
    assert report["greedy_token_agreement"] == 1.0
    assert report["verifiers"][0] == "transformers"
    # the adapter moves the logits far more than the GGUF round trip does, so the check means something
    assert report["adapter_effect_max_abs_logit_diff"] > 50 * report["max_abs_logit_diff"]
    assert report["base_check"]["passed"] and report["base_check"]["type"] == "f16"
    assert json.loads((path.parent / "export_report.json").read_text())["passed"] is True
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["Modelfile", "adapter.gguf", "base-f16.gguf", "export_report.json"]
    lines = (path.parent / "Modelfile").read_text().splitlines()
    assert lines[:2] == ["FROM ./base-f16.gguf", "ADAPTER ./adapter.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in lines


def test_base_gguf_given_writes_no_base(strong_qk, exported, tmp_path):
    base = exported[1].parent / "base-f16.gguf"
    out = tmp_path / "elsewhere" / "tuned.gguf"
    code, stdout, stderr = cli_in_process(
        "export", "gguf-adapter", str(strong_qk), "--out", str(out), "--base-gguf", str(base)
    )
    assert code == 0, stderr
    assert "greedy agreement 100%" in stdout and "transformers" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "export_report.json", "tuned.gguf"]
    report = json.loads((out.parent / "export_report.json").read_text())
    assert report["passed"] and not report["base_written"] and report["base_type"] == "f16"
    assert (
        report["relative_logit_diff"] <= verify.F16_REL_TOLERANCE and report["greedy_token_agreement"] == 1.0
    )
    lines = (out.parent / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM {base.resolve()}", "ADAPTER ./tuned.gguf"]


def test_dora_adapter_is_refused_in_one_line(runs, tmp_path):
    out = tmp_path / "dora" / "adapter.gguf"
    code, stdout, stderr = cli_in_process("export", "gguf-adapter", str(runs["dora"]), "--out", str(out))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "DoRA" in stderr and "llama-lora merge" in stderr and "export gguf" in stderr
    assert not out.parent.exists() and not (runs["dora"] / "gguf-adapter").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"init_lora_weights": "pissa"}, "unconverted pissa"),
        ({"bias": "all"}, "trained biases"),
    ],
)
def test_unmappable_adapters_are_refused(runs, change, named):
    adapter = runs["lora"] / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text()) | change
    keys = list(load_file(adapter / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match=named):
        gguf_adapter.check_mappable(adapter, cfg, keys)
    embed = "base_model.model.model.embed_tokens.lora_embedding_A"
    with pytest.raises(ExportError, match="outside the 7 Llama projections"):
        gguf_adapter.check_mappable(
            adapter, json.loads((adapter / "adapter_config.json").read_text()), [*keys, embed]
        )


def test_rslora_alpha_keeps_peft_scaling():
    assert gguf_adapter.gguf_alpha({"r": 4, "lora_alpha": 8}) / 4 == 8 / 4
    assert gguf_adapter.gguf_alpha({"r": 16, "lora_alpha": 8, "use_rslora": True}) / 16 == pytest.approx(
        8 / 4
    )


def test_broken_adapter_fails_the_check_and_leaves_no_file(strong_qk, exported, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_adapter, "permute", lambda w, n_head: w)  # q/k lora_b left in HF row order
    shutil.copy(exported[1].parent / "base-f16.gguf", tmp_path / "base.gguf")
    out = tmp_path / "out" / "adapter.gguf"
    with pytest.raises(verify.ExportCheckError, match="nothing written"):
        gguf_adapter.export_gguf_adapter(strong_qk, out, tmp_path / "base.gguf", log=quiet)
    assert sorted(p.name for p in out.parent.iterdir()) == ["export_report.json"]
    report = json.loads((out.parent / "export_report.json").read_text())
    assert report["passed"] is False and report["relative_logit_diff"] > verify.F16_REL_TOLERANCE
