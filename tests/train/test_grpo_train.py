"""GRPO training on the tiny model: two steps end to end (sampling, rewards, metrics, samples.jsonl, eval by
generation), a reward that fails stops the run in one line with its checkpoint intact, a run killed with
SIGKILL resumes to exactly the uninterrupted run, and the loss module's log-probabilities are the model's."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from llama_lora import run_dir
from llama_lora.config import load_config
from llama_lora.train import checkpoint
from llama_lora.train.loop import train
from tests.conftest import cli_in_process, run_cli, tiny_overrides
from tests.train.test_reliability import adapter_max_diff, start_training, wait_for

REWARDS = '''
def longer(completions, **kwargs):
    """More characters, more reward: a random model's completions differ in it, so groups have a spread."""
    return [len(c) / 40 for c in completions]


CALLS = []


def fails_later(completions, answer, **kwargs):
    CALLS.append(1)
    if len(CALLS) == 3:
        raise ValueError("cannot read the answer")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return root


def grpo_overrides(model_dir: Path, root: Path, out: Path, **extra) -> list[str]:
    settings = {
        "train.objective": "grpo",
        "train.rewards": f"[exact_answer,{root / 'rewards.py'}:longer]",
        "train.num_generations": 4,
        "train.batch_size": 8,
        "train.max_completion_length": 10,
        "train.max_steps": 2,
        "train.learning_rate": 5e-3,
        "train.lr_scheduler": "constant",
        "train.warmup_ratio": 0.0,
        "data.eval_fraction": 0.2,
        **extra,
    }
    return tiny_overrides(model_dir, root / "prompts.jsonl", out, **settings)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_grpo_steps_sample_score_and_train(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    result = train(load_config(overrides=grpo_overrides(tiny_model_dir, prompts, out)), quiet=True)
    assert result.summary["objective"] == "grpo" and result.summary["steps"] == 2
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rewards/longer/mean"] > 0 and r["reward_std"] > 0  # the groups had a spread to learn from
        assert r["accuracy/exact_answer"] == r["rewards/exact_answer/mean"]
        assert 0 < r["completions/mean_length"] <= r["completions/max_length"] <= 10
        assert 0 <= r["completions/clipped_ratio"] <= 1 and r["sampling_seconds"] > 0
        assert r["training_seconds"] > 0 and "clip_ratio/region_mean" in r and "kl" not in r  # beta 0
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and all("eval_accuracy/exact_answer" in r for r in evals)
    shown = read_jsonl(out / "samples.jsonl")
    assert {r["step"] for r in shown} == {1, 2} and len(shown) == 4  # 2 prompts per step, one each
    assert all(
        set(r["rewards"]) == {"exact_answer", "longer"} and r["prompt"].startswith("What is") for r in shown
    )
    # the adapter moved: B started at zero
    moved = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert moved and max(float(p.detach().abs().max()) for p in moved) > 0

    # compare: the held-out prompts answered greedily by both sides, scored by the run's rewards
    code, _, err = cli_in_process("compare", str(out), "--max-new-tokens", "6")
    assert code == 0, err
    compared = json.loads((out / "compare.json").read_text())
    for side in (compared["base"], compared["adapter_metrics"]):
        assert {"reward", "reward/exact_answer", "accuracy/exact_answer", "reward/longer"} <= set(side)
        assert "eval_loss" not in side and side["reward"] > 0  # longer: every reply has characters
    assert compared["n"] == 4 and all(ex["reference"] for ex in compared["examples"])  # the answer column
    assert "held-out accuracy (exact_answer)" in (out / "report.md").read_text()


def test_grpo_with_kl_and_reused_completions_logs_kl(tiny_model_dir, prompts, tmp_path):
    extra = {"train.beta": 0.04, "train.num_iterations": 2, "train.max_steps": 2, "train.loss_type": "grpo"}
    out = tmp_path / "run"
    train(load_config(overrides=grpo_overrides(tiny_model_dir, prompts, out, **extra)), quiet=True)
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert steps[1]["kl"] > 0  # step 2 reuses step 1's completions after an update: ratios and KL move
    assert "reward" in steps[0] and "reward" not in steps[1]  # nothing new was sampled for step 2
    assert {r["step"] for r in read_jsonl(out / "samples.jsonl")} == {1}


def test_from_a_trained_adapter_the_kl_reference_is_that_adapter(tiny_model_dir, prompts, tmp_path):
    """beta > 0 with model.adapter: the reference is the adapter training starts from (kept in memory), not
    the base; at the first step policy and reference are the same model, so the KL is 0."""
    first = tmp_path / "first"
    train(load_config(overrides=grpo_overrides(tiny_model_dir, prompts, first)), quiet=True)
    out = tmp_path / "then"
    extra = {"model.adapter": str(first), "train.beta": 0.04, "train.max_steps": 1}
    train(load_config(overrides=grpo_overrides(tiny_model_dir, prompts, out, **extra)), quiet=True)
    (step,) = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert step["kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_failing_reward_stops_in_one_line_naming_it_and_the_row(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    extra = {
        "train.rewards": f"[{prompts / 'rewards.py'}:fails_later]",
        "train.max_steps": 4,
        "train.save_steps": 1,
        "data.eval_fraction": 0.0,
    }
    done = run_cli("train", "--quiet", *grpo_overrides(tiny_model_dir, prompts, out, **extra))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in done.stderr
    assert "'fails_later'" in line and "cannot read the answer" in line and "row" in line
    saved = run_dir.checkpoint_dirs(out)  # steps 1 and 2 were saved; step 3's reward failed
    assert saved[-1].name == "checkpoint-2" and checkpoint.is_complete(saved[-1])


def test_grpo_resumes_after_sigkill_exactly(tiny_model_dir, prompts, tmp_path):
    extra = {"train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1}
    whole = tmp_path / "whole"
    train(load_config(overrides=grpo_overrides(tiny_model_dir, prompts, whole, **extra)), quiet=True)

    out = tmp_path / "run"
    args = grpo_overrides(tiny_model_dir, prompts, out, **extra)
    proc = start_training(*args)
    wait_for(out / "checkpoints" / "checkpoint-2", proc, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("train", "--quiet", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert adapter_max_diff(out / "adapter", whole / "adapter") <= 1e-6
    # the same completions were sampled after the resume, and nothing is logged twice
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(whole / "samples.jsonl")
    ours = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    theirs = [r for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert a["reward"] == pytest.approx(b["reward"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_the_loss_module_takes_each_completion_tokens_log_probability(packed):
    """GRPOLoss.token_logps (the fused frozen head, packed or padded rows, at a temperature) against
    log_softmax(logits / T) of the plain model, token by token."""
    from llama_lora.data.batching import collate
    from llama_lora.data.encoding import IGNORE, Example
    from llama_lora.kernels import row_attention
    from llama_lora.kernels.packing import collate_packed
    from llama_lora.train.objectives.grpo import GRPOLoss
    from tests.conftest import tiny_llama

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = [([5, 6, 7], [8, 9, 10, 2]), ([11, 12], [13, 14]), ([3, 4, 5, 6], [7])]
    examples = [Example(p + c, [IGNORE] * len(p) + c) for p, c in rows]
    if packed:
        row_attention.enable(model)
    batch = collate_packed(examples) if packed else collate(examples, 0)
    loss = GRPOLoss(model, "dapo", 0.2, 0.2, 0.0, temperature=0.7, max_completion_length=4)
    got = loss.token_logps(**batch, width=4)
    for i, (p, c) in enumerate(rows):
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float() / 0.7
        want = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(got[i, : len(c)], want, atol=1e-5)
        assert torch.all(got[i, len(c) :] == 0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_processes_split_the_groups_and_train_as_one(tiny_model_dir, prompts, tmp_path):
    """Data parallel: each process samples its share of the step's prompts (whole groups, the same seeds as
    one process would use), the step's units are summed over both; so the adapter and the logged rewards
    equal those of one process running the same micro-batches with grad_accum 2."""
    from safetensors.torch import load_file

    from tests.train.test_multi import torchrun

    extra = {"train.max_steps": 2, "train.device": "cpu", "data.eval_fraction": 0.0}
    two = tmp_path / "two"
    done = torchrun("train", "--quiet", *grpo_overrides(tiny_model_dir, prompts, two, **extra))
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    train(
        load_config(
            overrides=grpo_overrides(tiny_model_dir, prompts, one, **extra, **{"train.grad_accum": 2})
        ),
        quiet=True,
    )
    ours = [r for r in read_jsonl(two / "metrics.jsonl") if "loss" in r]
    theirs = [r for r in read_jsonl(one / "metrics.jsonl") if "loss" in r]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("reward", "reward_std", "completions/mean_length", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    mine, reference = (load_file(str(run / "adapter/adapter_model.safetensors")) for run in (two, one))
    for name, tensor in reference.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
