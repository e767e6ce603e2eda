"""The whole flow on the tiny model: train -> compare -> merge -> infer -> export gguf, as a user runs it.

The first test forces the base into bf16 storage during training (as `precision: auto` does on a CPU with
native bf16, and on CUDA), then loads the adapter onto a float32 base in every later command: the flow
that once shipped broken because the base fingerprint depended on the storage dtype.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from llama_lora import meta
from llama_lora.config import load_config
from llama_lora.evaluate import compare
from llama_lora.export import gguf_model, merge
from llama_lora.infer import generate, loading
from llama_lora.model import hardware, loader
from llama_lora.train.loop import train
from tests.conftest import run_cli, tiny_overrides

# Other libraries' output: tqdm bars, Python warnings, tracebacks (the same pattern .ci/check_demo.py uses).
NOISE = re.compile(r"\d+%\||it/s\]|s/it\]|Warning:|warnings\.warn\(|^WARNING|Traceback", re.MULTILINE)


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def count_rows(tmp_path_factory):
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(k) for k in range(1, i + 2))}
        for i in range(24)
    ]
    path = tmp_path_factory.mktemp("e2e-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's shape and tokenizer with other random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other-base")
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_adapter_trained_on_a_bf16_base_loads_on_the_float32_base(
    tiny_model_dir, other_base_dir, count_rows, tmp_path
):
    run = tmp_path / "bf16-run"
    overrides = tiny_overrides(tiny_model_dir, count_rows, run, **{"train.precision": "bf16"})
    summary = train(load_config(overrides=[*overrides, "model.dtype=bfloat16"]), quiet=True).summary
    assert summary["precision"] == "bf16"
    stored = json.loads((run / "adapter" / meta.META_FILE).read_text())["base_fingerprint"]

    loaded = loading.load(adapter=str(run), log=quiet)  # infer and chat load this way, on a float32 base
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert (
        generate.generate(
            loaded,
            [{"role": "user", "content": "Count to 2."}],
            generate.GenerationSettings(max_new_tokens=4),
        ).text
        is not None
    )
    report = compare.compare(str(run), n=3, max_new_tokens=4, log=quiet)
    assert report["adapter_metrics"]["eval_loss"] > 0
    merged = merge.merge(str(run), log=quiet)
    assert merged["passed"]
    exported = gguf_model.export_gguf(run, kind="f16", new_tokens=4, log=quiet)
    assert exported["passed"]

    with pytest.raises(loading.InferenceError, match="different base model"):
        loading.load(adapter=str(run), base=str(other_base_dir), log=quiet)
    other = loader.load_model(load_config(overrides=[f"model.name={other_base_dir}"]).model, torch.float32)
    assert not meta.fingerprint_matches(stored, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_is_independent_of_the_storage_dtype(dtype):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    stored = meta.base_fingerprint(model)
    json.dumps(stored)  # written into llama_lora.json
    assert meta.fingerprint_matches(stored, model.to(dtype))
    assert meta.fingerprint_matches(stored, model.to(dtype).float())


def test_fingerprint_refuses_other_weights_and_other_shapes():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    stored = meta.base_fingerprint(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 5] *= 1.1  # one value of 128 moved by 10%
    assert not meta.fingerprint_matches(stored, model)
    assert not meta.fingerprint_matches({**stored, "num_hidden_layers": 3}, tiny_llama())


def test_fingerprint_of_older_adapters_still_matches():
    """Adapters written before `embedding_sample`: a hash of the 16x16 corner in the load dtype."""
    import hashlib

    from tests.conftest import tiny_llama

    model = tiny_llama()
    for dtype in (torch.float32, torch.bfloat16):
        corner = model.get_input_embeddings().weight[:16, :16].detach().to(dtype).float()
        legacy = {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "vocab_size": 256,
            "embedding_sha256": hashlib.sha256(corner.contiguous().numpy().tobytes()).hexdigest()[:16],
        }
        assert meta.fingerprint_matches(legacy, model)
    assert not meta.fingerprint_matches({**legacy, "embedding_sha256": "0" * 16}, model)


def test_the_whole_flow_through_the_cli_under_the_default_policy(tiny_model_dir, count_rows, tmp_path):
    """train -> compare -> merge -> infer -> export gguf, with the machine's own device and precision."""
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir, count_rows, run, **{"train.precision": "auto", "train.device": "auto"}
    )
    steps = [
        ("train", *overrides, "train.max_steps=6", "train.learning_rate=5e-3"),
        ("compare", str(run), "--n", "3", "--max-new-tokens", "6"),
        ("merge", str(run)),
        ("infer", "--base", str(run / "merged"), "--max-new-tokens", "4", "Count to 3."),
        ("infer", "--adapter", str(run), "--max-new-tokens", "4", "Count to 3."),
        ("export", "gguf", str(run), "--type", "q8_0"),
    ]
    for step in steps:
        result = run_cli(*step)
        assert result.returncode == 0, f"{step[0]}: {result.stderr}"
        assert not NOISE.search(result.stdout + result.stderr), f"{step[0]}: {result.stderr}"
    summary = json.loads((run / "train_summary.json").read_text())
    device = hardware.resolve_device("auto")
    assert (summary["device"], summary["precision"]) == (device, hardware.resolve_precision(device, "auto"))
    report = json.loads((run / "compare.json").read_text())
    assert report["n"] == 2  # the held-out 10% of 24 rows
    assert report["adapter_metrics"]["eval_loss"] < report["base"]["eval_loss"]
    assert json.loads((run / "merged" / "merge_report.json").read_text())["passed"]
    assert json.loads((run / "export_report.json").read_text())["passed"]
    assert (run / "model-q8_0.gguf").stat().st_size > 0 and (run / "Modelfile").is_file()


def test_verbose_shows_what_the_libraries_print(tiny_model_dir, tmp_path):
    """The quiet default hides something real: loading weights shows transformers' tqdm bar.
    (Without `--verbose` the same commands are checked quiet in the whole-flow test above.)"""
    loud = run_cli("infer", "--base", str(tiny_model_dir), "hi", "--max-new-tokens", "2", "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert NOISE.search(loud.stderr), loud.stderr
