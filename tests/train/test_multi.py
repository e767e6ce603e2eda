"""Data parallel: two CPU processes (gloo) under torchrun train like one process with the same step groups,
and only the main process writes the run directory. Also: QLoRA's clear error off CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_lora.config import load_config
from llama_lora.errors import ConfigError
from llama_lora.train.loop import train
from tests.conftest import tiny_overrides

SRC = Path(__file__).resolve().parents[2] / "src"


def torchrun(*args: str, processes: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # two processes share the machine
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run(
        [*command, "-m", "llama_lora", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_processes_match_one_process_with_the_same_step_groups(tmp_path, tiny_model_dir, alpaca_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = {"train.device": "cpu", "train.max_steps": 6, "train.eval_steps": 2, "train.logging_steps": 1}
    two = tmp_path / "two"
    done = torchrun(
        "train",
        "--quiet",
        *tiny_overrides(tiny_model_dir, alpaca_file, two, **common, **{"train.save_steps": 3}),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1  # only the main process reports

    # one process whose optimizer steps hold the same micro-batches: grad_accum 2 = 2 processes x 1
    one = tmp_path / "one"
    single = train(
        load_config(
            overrides=tiny_overrides(tiny_model_dir, alpaca_file, one, **common, **{"train.grad_accum": 2})
        ),
        quiet=True,
    )

    # one run directory, written once, with nothing left over from the other process
    names = sorted(p.name for p in two.iterdir())
    assert names == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "loss.png",
        "metrics.jsonl",
        "status.json",
        "train_summary.json",
    ]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-3"]
    rng = load_file(str(two / "checkpoints/checkpoint-3/rng.safetensors"))
    assert "rank1_torch_cpu" in rng  # the other process's generator, for an exact resume

    logged = records(two)
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert losses[0] > losses[-1]

    # the gradient of each step is the single-process gradient of the same global batch
    expected = records(one)
    assert len(logged) == len(expected)
    for got, want in zip(logged, expected):
        assert got["step"] == want["step"]
        for key in ("loss", "eval_loss"):
            if want.get(key) is not None:
                assert got[key] == pytest.approx(want[key], abs=1e-5), (got, want)
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert summary["train_tokens"] == single.summary["train_tokens"]  # global, not one process's share
    mine, reference = (
        load_file(str(two / "adapter/adapter_model.safetensors")),
        load_file(str(one / "adapter/adapter_model.safetensors")),
    )
    assert mine.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-5, rtol=1e-4, msg=name)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(two / "adapter"))  # plain PEFT loads it


def test_load_in_4bit_off_cuda_is_a_clear_config_error(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    cfg = load_config(
        overrides=tiny_overrides(
            tiny_model_dir, alpaca_file, out, **{"model.load_in_4bit": True, "train.device": "cpu"}
        )
    )
    with pytest.raises(ConfigError, match=r"^model\.load_in_4bit: .*CUDA") as caught:
        train(cfg, quiet=True)
    assert caught.value.exit_code == 2
    assert not out.exists()  # raised before anything was written


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_unsupported_set_ups_are_refused_with_a_pointer_to_the_docs(kind):
    """DeepSpeed and FSDP version 1 are refused; an accelerate config with FSDP version 2 shards the run
    (train.sharding: fsdp), plain data parallel runs as it is."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llama_lora.train import parallel

    with pytest.raises(parallel.ParallelError, match="docs/multi_gpu.md") as caught:
        parallel.check_supported(SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=False))
    assert caught.value.exit_code == 2
    assert ("version 1" in str(caught.value)) == (kind == "FSDP")
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    assert parallel.check_supported(fsdp2) is True
    assert parallel.check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)) is False


def test_every_process_joins_every_all_reduce_even_in_a_short_last_step():
    from llama_lora.train.parallel import my_share

    group = [[0], [1], [2]]  # 3 micro-batches for 2 processes
    assert my_share(group, 0, 2) == [([0], 1.0), ([2], 1.0)]
    assert my_share(group, 1, 2) == [([1], 1.0), ([0], 0.0)]  # a weightless re-run keeps it in step
    assert my_share([[5]], 0, 1) == [([5], 1.0)]


def test_load_in_4bit_without_bitsandbytes_names_the_package(monkeypatch):
    import importlib.util

    from llama_lora.config import ModelConfig
    from llama_lora.model import loader

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"^model\.load_in_4bit: needs the bitsandbytes package"):
        loader.check_load_in_4bit(ModelConfig(load_in_4bit=True), "cuda")
    loader.check_load_in_4bit(ModelConfig(), "cpu")  # off: nothing to check


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_dpo_on_two_processes_matches_one_process(tmp_path, tiny_model_dir, pairs_file):
    """DPO data parallel: losses, eval losses and reward metrics summed over both processes' pairs equal
    one process's on the same step groups."""
    common = {
        "train.device": "cpu",
        "train.objective": "dpo",
        "train.learning_rate": 5e-3,
        "train.max_steps": 4,
        "train.eval_steps": 2,
        "train.batch_size": 3,
        "data.eval_fraction": 0.25,
    }
    two = tmp_path / "two"
    done = torchrun("train", "--quiet", *tiny_overrides(tiny_model_dir, pairs_file, two, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    overrides = tiny_overrides(tiny_model_dir, pairs_file, one, **common, **{"train.grad_accum": 2})
    train(load_config(overrides=overrides), quiet=True)
    logged, expected = records(two), records(one)
    assert [r["step"] for r in logged] == [r["step"] for r in expected]
    keys = {"loss", "eval_loss", "rewards/accuracies", "rewards/margins", "eval_rewards/margins"}
    compared = 0
    for got, want in zip(logged, expected):
        for key in keys & want.keys():
            assert got[key] == pytest.approx(want[key], abs=1e-5), (key, got, want)
            compared += 1
    assert compared >= 12
