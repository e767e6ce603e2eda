"""Sharded training (train.sharding: fsdp, FSDP2) on two CPU processes (gloo) under torchrun: the same logged
losses and the same adapter as one unsharded process on the same micro-batches; a kill and --resume under
sharding (with gradient checkpointing) equals the uninterrupted sharded run; each process holds half of the
model's parameters; DPO in bf16 runs sharded; what sharding does not cover is refused in one line. The sharded
build never holds the whole base: it stays on the meta device until split, each process reads only its rows,
and every shard (base, adapter, DoRA magnitude, buffers) and the generator come out as one process has them.

Run as a script under torchrun (`--build-worker`), this file is the worker of that last test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_lora.config import load_config
from llama_lora.train.loop import train
from tests.conftest import TINY_SHAPE, cli_in_process, tiny_overrides
from tests.train.test_multi import SRC, records, torchrun
from tests.train.test_reliability import wait_for

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

# DoRA, so that its weight norm is taken over sharded rows; PEFT's own layers and padded batches (the fast
# path's own test below turns it on, on both sides)
COMMON = {
    "train.device": "cpu",
    "train.max_steps": 12,
    "train.eval_steps": 4,
    "train.save_steps": 3,
    "train.logging_steps": 1,
    "train.batch_size": 2,
    "train.fused": False,
    "train.packing": False,
    "peft.use_dora": True,
}
SHARDED = {**COMMON, "train.sharding": "fsdp"}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter/adapter_model.safetensors"))


def _failure(stderr: str) -> str:
    """A failed launch's story: every process's own error lines first (a rank's abort is otherwise lost
    behind the other's traceback), then the end of the output."""
    own = [line for line in stderr.splitlines() if "Error" in line or "error" in line or "terminate" in line]
    return "\n".join(own[-40:]) + "\n---\n" + stderr[-3000:]


def _assert_same_run(got: Path, want: Path) -> None:
    logged, expected = records(got), records(want)
    assert [r["step"] for r in logged] == [r["step"] for r in expected]
    assert sum("loss" in r for r in logged) == 12 and sum("eval_loss" in r for r in logged) == 4
    for a, b in zip(logged, expected):
        for key in ("loss", "eval_loss"):
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
    mine, reference = _adapter(got), _adapter(want)
    assert mine.keys() == reference.keys() and any("magnitude" in k for k in mine)
    for name, tensor in reference.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """The data file and an uninterrupted 2-process sharded run on it."""
    root = tmp_path_factory.mktemp("sharded")
    rows = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
        for i in range(24)
    ]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = torchrun("train", "--quiet", *tiny_overrides(tiny_model_dir, data, root / "two", **SHARDED))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1  # only the main process reports
    return data, root / "two"


def test_two_sharded_processes_match_one_process(tmp_path, tiny_model_dir, sharded_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data, two = sharded_run
    one = tmp_path / "one"  # one unsharded process, the same micro-batches a step: grad_accum 2
    overrides = tiny_overrides(tiny_model_dir, data, one, **COMMON, **{"train.grad_accum": 2})
    train(load_config(overrides=overrides), quiet=True)
    _assert_same_run(two, one)

    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharding"] == "fsdp"
    assert summary["settings"]["fast_path"] == {"fused": False, "packing": False, "grouped_kv": False}
    whole = json.loads((one / "train_summary.json").read_text())["peak_memory_per_process"][0]
    peaks = summary["peak_memory_per_process"]
    assert len(peaks) == 2 and all(p["peak_rss_mb"] > 0 for p in peaks)
    for p in peaks:  # each process keeps half of every parameter (rows split in two, up to one row)
        assert p["parameters_mb"] == pytest.approx(whole["parameters_mb"] / 2, rel=0.02)

    # checkpoints hold the full adapter and optimizer state, as a single-process checkpoint does
    ckpt = two / "checkpoints/checkpoint-9"
    reference = _adapter(one)
    assert set(load_file(str(ckpt / "adapter/adapter_model.safetensors"))) == set(reference)
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    shapes = sorted(tuple(t.shape) for k, t in opt.items() if k.endswith("exp_avg"))
    assert shapes == sorted(tuple(t.shape) for t in reference.values())  # full, not one process's half

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(two / "adapter"))  # plain PEFT loads it


def test_the_fast_path_under_sharding_matches_one_process_with_it(tmp_path, tiny_model_dir, sharded_run):
    """Fused layers and packed batches, with the embedding and head split by vocabulary, on two processes:
    the same losses and adapter as one process with the fast path on the same micro-batches."""
    data, _ = sharded_run
    fast = {"train.fused": True, "train.packing": True}
    two = tmp_path / "two"
    done = torchrun("train", "--quiet", *tiny_overrides(tiny_model_dir, data, two, **{**SHARDED, **fast}))
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    overrides = tiny_overrides(tiny_model_dir, data, one, **{**COMMON, **fast, "train.grad_accum": 2})
    train(load_config(overrides=overrides), quiet=True)
    _assert_same_run(two, one)
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["settings"]["fast_path"] == {"fused": True, "packing": True, "grouped_kv": True}


def test_sharded_kill_then_resume_equals_the_uninterrupted_sharded_run(tmp_path, tiny_model_dir, sharded_run):
    """With gradient checkpointing on, against the uninterrupted run without it: recomputing each layer in
    backward (its weights gathered again) changes nothing either."""
    data, whole = sharded_run
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, data, out, **SHARDED, **{"train.gradient_checkpointing": True})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*command, "-m", "llama_lora", "train", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # the launcher and both workers in one process group
    )
    wait_for(out / "checkpoints" / "checkpoint-3", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()

    resumed = torchrun("train", "--quiet", *args, "--resume")
    assert resumed.returncode == 0, _failure(resumed.stderr)
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 13))
    a, b = _adapter(out), _adapter(whole)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    for x, y in zip(records(out), records(whole)):
        assert x.get("loss") == pytest.approx(y.get("loss"), abs=1e-6)

    assert json.loads((out / "train_summary.json").read_text())["gradient_checkpointing"] is True
    code, _, err = cli_in_process("train", "--quiet", *args, "--resume")  # one process: a one-line refusal
    assert code == 2 and "saved by a run on 2 process(es)" in err
    assert len(err.strip().splitlines()) == 1


def test_dpo_in_bf16_under_sharding(tmp_path, tiny_model_dir, pairs_file):
    """Preference tuning and the bf16 policy (bf16 base, float32 adapter) run sharded, rewards logged."""
    out = tmp_path / "dpo"
    extra = {
        **SHARDED,
        "train.objective": "dpo",
        "train.precision": "bf16",
        "train.max_steps": 4,
        "train.eval_steps": 2,
        "data.eval_fraction": 0.25,
    }
    done = torchrun("train", "--quiet", *tiny_overrides(tiny_model_dir, pairs_file, out, **extra))
    assert done.returncode == 0, done.stderr[-3000:]
    logged = records(out)
    assert logged[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts at its reference
    assert all("rewards/margins" in r for r in logged if "loss" in r)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["sharding"] == "fsdp" and summary["settings"]["storage_dtype"] == "bfloat16"


def test_what_sharding_does_not_cover_is_refused_in_one_line(tmp_path, tiny_model_dir, alpaca_file):
    from llama_lora.errors import ConfigError
    from llama_lora.train import sharding

    out = tmp_path / "run"
    extra = {**SHARDED, "peft.init_lora_weights": "pissa"}
    code, _, err = cli_in_process("train", *tiny_overrides(tiny_model_dir, alpaca_file, out, **extra))
    assert code == 2 and "peft.init_lora_weights: pissa" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # fp16 (CUDA only, so checked on the config here): its loss scaler does not cover sharded gradients
    fp16 = load_config(
        overrides=tiny_overrides(tiny_model_dir, alpaca_file, out, **SHARDED, **{"train.precision": "fp16"})
    )
    with pytest.raises(ConfigError, match="bf16 or fp32"):
        sharding.check(fp16, "cuda")


def test_one_process_asked_to_shard_trains_unsharded_and_says_so(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, alpaca_file, out, **{**SHARDED, "train.max_steps": 2})
    code, stdout, err = cli_in_process("train", *overrides)
    assert code == 0, err
    assert "nothing to shard" in stdout + err
    assert json.loads((out / "train_summary.json").read_text())["sharding"] == "none"


def test_the_sharded_build_reads_only_its_rows_and_starts_as_one_process(
    tmp_path, tiny_model_dir, alpaca_file
):
    """Each process builds the base on the meta device, reads only its own rows (half of every tensor), and
    ends with exactly one process's values in every shard: the base, the adapter's seeded draws, DoRA's
    magnitude, the rotary buffers; and the generator where one process leaves it. Cases: float32 DoRA on a
    tied base; bf16 with dropout and gradient checkpointing; LoRA with gaussian init on an untied base stored
    in several files; a continued adapter (model.adapter)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    untied = tmp_path / "untied"
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), **{**TINY_SHAPE, "num_hidden_layers": 3})
    LlamaForCausalLM(config).save_pretrained(untied, max_shard_size="2MB")
    tokenizer.save_pretrained(untied)
    assert len(list(untied.glob("*.safetensors"))) > 1
    continued = tmp_path / "continued"
    train(load_config(overrides=tiny_overrides(tiny_model_dir, alpaca_file, continued, **COMMON)), quiet=True)

    def case(model, **extra):
        return tiny_overrides(model, alpaca_file, tmp_path / "unused", **{**COMMON, **extra})

    cases = [
        case(tiny_model_dir),
        case(tiny_model_dir, **{"train.precision": "bf16", "peft.lora_dropout": 0.05}),
        case(untied, **{"peft.use_dora": False, "peft.init_lora_weights": "gaussian"}),
        case(tiny_model_dir, **{"model.adapter": str(continued), "train.gradient_checkpointing": True}),
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC.parent), str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    done = subprocess.run(
        [*command, "--build-worker", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        for i, got in enumerate(json.loads((tmp_path / f"rank{rank}.json").read_text())):
            where = f"rank {rank}, case {i}"
            assert got["on_meta"], where  # nothing of the base held after load
            assert got["read"] <= got["base"] / 2 + got["corner"], (
                where
            )  # its own rows, and the fingerprint's
            assert got["held"] == pytest.approx(got["whole"] / 2, rel=0.01), where
            assert got["different"] == [] and got["buffers_different"] == [], where
            assert got["same_generator"] and got["same_fingerprint"], where


def _build_worker(directory: Path) -> None:
    """Under torchrun: for each case of cases.json, one process's model built unsharded (the reference) and
    this launch's sharded build, compared; writes rank<N>.json for the test."""
    from llama_lora.train import build, shard_loading, sharding
    from llama_lora.train.strategy import Sharded, make_accelerator

    accelerator = make_accelerator("cpu", "fp32")
    read = []
    reader = shard_loading.read_rows

    def counting(path, key, start, stop):
        rows = reader(path, key, start, stop)
        read.append(rows.numel())
        return rows

    shard_loading.read_rows = counting
    report = []
    for overrides in json.loads((directory / "cases.json").read_text()):
        cfg = load_config(overrides=overrides)
        one = build.attach(build.load(cfg))
        generator = torch.get_rng_state()
        want = {name: p.detach().clone() for name, p in one.objective.module.named_parameters()}
        buffers = {name: b.clone() for name, b in one.objective.module.named_buffers()}
        base = sum(p.numel() for p in one.loaded.model.parameters() if not p.requires_grad)
        read.clear()
        loaded = build.load(cfg, sharded=True)
        on_meta = all(p.is_meta for p in loaded.model.parameters())
        two = build.attach(loaded, accelerator.num_processes, strategy=Sharded(accelerator))
        module = two.objective.module
        got = {name: p.full_tensor() for name, p in module.named_parameters()}  # every process takes part
        report.append(
            {
                "on_meta": on_meta,
                "read": sum(read),
                "base": base,
                "corner": shard_loading.CORNER * one.loaded.model.config.hidden_size,
                "held": sharding.local_bytes(module),
                "whole": sharding.local_bytes(one.objective.module),
                "different": [n for n in want if n not in got or not torch.equal(got[n], want[n])],
                "buffers_different": [n for n, b in module.named_buffers() if not torch.equal(b, buffers[n])],
                "same_generator": torch.equal(torch.get_rng_state(), generator),
                "same_fingerprint": loaded.fingerprint == one.loaded.fingerprint,
            }
        )
    (directory / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["--build-worker"]:
    _build_worker(Path(sys.argv[2]))


def test_a_sharded_cpu_process_fixes_the_malloc_threshold():
    """settle_allocator reaches glibc's mallopt on Linux (in a fresh process: the setting is process-wide)."""
    import platform

    code = "import torch; from llama_lora.train.sharding import settle_allocator as s; "
    code += "print(s(torch.device('cpu')), s(torch.device('meta')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert done.stdout.split() == [str(glibc), "False"]
