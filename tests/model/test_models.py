"""Model resolution, GGUF conversion, hub errors, device and precision policy."""

from __future__ import annotations

import json
import time

import pytest
import torch

from llama_lora import hub
from llama_lora.errors import ConfigError, HubError, ModelError
from llama_lora.model import hardware, loader
from tests.conftest import run_cli


def test_resolve_kinds(tmp_path, tiny_model_dir):
    assert loader.resolve("meta-llama/Llama-3.2-1B-Instruct").kind == "hub"
    assert loader.resolve(str(tiny_model_dir)).kind == "local"
    assert loader.resolve("smollm2-135m-instruct").kind == "embedded"
    with pytest.raises(ModelError, match="no config.json"):
        loader.resolve(str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        loader.resolve(str(tmp_path / "missing.gguf"))


def test_embedded_model_converts_to_a_plain_trainable_model(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "chat_template.jinja").is_file() or "chat_template" in (
        smollm2_dir / "tokenizer_config.json"
    ).read_text()


def test_gguf_path_is_cached_under_llama_lora_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LORA_CACHE", str(tmp_path))
    assert loader.cache_dir() == tmp_path


def test_offline_hub_fails_fast_with_one_clear_paragraph(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(HubError) as info:
        hub.require_hub("meta-llama/Llama-3.2-1B-Instruct", "model")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "meta-llama/Llama-3.2-1B-Instruct" in message and "HF_TOKEN" in message and "\n" not in message


def test_gated_and_missing_repos_are_explained():
    from huggingface_hub import errors

    class Response:
        status_code = 401
        headers: dict = {}
        request = None

    gated = errors.GatedRepoError("401 Client Error", response=Response())
    wrapped = OSError("You are trying to access a gated repo.")
    wrapped.__cause__ = gated
    message = str(hub.explain(wrapped, "org/m", "model"))
    assert "refused" in message and "accept its licence" in message
    Response.status_code = 404
    missing = OSError("not found")
    missing.__cause__ = errors.RepositoryNotFoundError("404", response=Response())
    assert "does not exist" in str(hub.explain(missing, "org/m", "model"))


def test_seed_preset_offline_fails_fast_without_traceback():
    start = time.perf_counter()
    result = run_cli("train", "--preset", "seed", env={"HF_HUB_OFFLINE": "0"})
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "meta-llama/Llama-3.2-1B-Instruct" in result.stderr and "Hugging Face hub" in result.stderr
    assert elapsed < 30


def test_precision_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_precision("cuda", "auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_precision("cuda", "auto") == "fp16"  # never both
    assert hardware.resolve_precision("mps", "auto") == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("cpu", "auto") == "fp32"
    with pytest.raises(ConfigError, match="train.precision"):
        hardware.resolve_precision("cpu", "fp16")


def test_device_auto_detection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert hardware.resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="train.device"):
        hardware.resolve_device("cuda")


def test_hub_dataset_offline_is_a_clear_error(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run_cli(
        "train",
        f"model.name={tiny_model_dir}",
        "data.source=tatsu-lab/alpaca",
        f"output.dir={out}",
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dataset 'tatsu-lab/alpaca'" in result.stderr and "data.source" in result.stderr
    assert not out.exists()


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_LORA_CACHE", str(tmp_path))
    gguf = loader.embedded_gguf("smollm2-135m-instruct")
    ref = loader.resolve(str(gguf))
    assert ref.kind == "gguf"
    path = loader.local_path(ref, log=lambda *a: None)
    assert path.startswith(str(tmp_path / "models"))
    config = json.loads((tmp_path / "models" / path.rsplit("/", 1)[-1] / "config.json").read_text())
    assert "quantization_config" not in config
    assert loader.local_path(ref, log=lambda *a: 1 / 0) == path  # cached: no second conversion


def test_auto_gradient_checkpointing_follows_free_memory(monkeypatch):
    from types import SimpleNamespace

    from llama_lora.train import memory

    config = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)
    per_token = memory.activation_bytes_per_token(config)
    assert 60_000 * 30 < per_token < 100_000 * 30  # the measured 56-75 KB per layer-token, rounded up
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 20 * 2**30)
    assert not memory.choose_checkpointing("auto", config, 1024, "cpu").enabled
    assert memory.choose_checkpointing("auto", config, 1024 * 128, "cpu").enabled  # ~300 GB of activations
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2 * 2**30)
    choice = memory.choose_checkpointing("auto", config, 1024, "cpu")
    assert choice.enabled and "2.0 GB free" in choice.reason
    assert memory.choose_checkpointing(False, config, 1024 * 128, "cpu").enabled is False
    assert memory.choose_checkpointing(True, config, 16, "cpu").enabled is True


def test_checkpointing_is_enabled_without_the_deprecated_name(tiny_model_dir):
    """transformers 5.2x warns (FutureWarning, removal in v6) on `gradient_checkpointing_enable`: the tested
    release must take the new name, and the layers must checkpoint either way."""
    import warnings

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loader.enable_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
