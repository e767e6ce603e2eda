"""GRPO's loss and advantages against TRL 1.16's GRPOTrainer: `_compute_loss` runs unmodified on a bare
instance (`_stub`) whose per-token log-probabilities are given tensors, for every loss type, with and
without the KL term, with ratios far enough from 1 for the clip to act."""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llama_lora.train.objectives.grpo import batch_loss, clip_ratios, group_advantages, token_losses

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl", minversion="1.16")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

TOL = 1e-6
MAX_COMPLETION = 7


def _trainer(logps: torch.Tensor, loss_type: str, beta: float, eps_low: float, eps_high: float):
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            reduce=lambda x, reduction="sum": x, gather=lambda x: x, num_processes=1, sync_gradients=True
        ),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        loss_type=loss_type,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION,
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return trainer


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = -(torch.rand(n, MAX_COMPLETION, generator=g) * 4 + 0.05)
    old = logps + (torch.rand(n, MAX_COMPLETION, generator=g) - 0.5) * 0.8  # ratios 0.67-1.49: the clip acts
    ref = logps + (torch.rand(n, MAX_COMPLETION, generator=g) - 0.5) * 2
    mask = torch.ones(n, MAX_COMPLETION)
    for row, length in enumerate(torch.randint(1, MAX_COMPLETION + 1, (n,), generator=g).tolist()):
        mask[row, length:] = 0  # completions of different lengths, right-padded
    advantages = torch.randn(n, generator=g)
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_grpo_trainer(loss_type, beta):
    logps, old, ref, mask, advantages = _inputs(6, seed=1)
    eps_low, eps_high = 0.2, 0.28
    theirs = logps.clone().requires_grad_()
    trainer = _trainer(theirs, loss_type, beta, eps_low, eps_high)
    inputs = {
        "prompt_ids": torch.zeros(6, 3, dtype=torch.long),
        "prompt_mask": torch.ones(6, 3, dtype=torch.long),
        "completion_ids": torch.zeros(6, MAX_COMPLETION, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    want = GRPOTrainer._compute_loss(trainer, None, inputs)
    (want_grad,) = torch.autograd.grad(want, theirs)

    ours = logps.clone().requires_grad_()
    per_token, kl, ratio = token_losses(ours, old, advantages, eps_low, eps_high, beta, ref)
    loss_sum, units = batch_loss(per_token, mask, loss_type, MAX_COMPLETION)
    (grad,) = torch.autograd.grad(loss_sum / units, ours)
    assert abs((loss_sum / units).item() - want.item()) < TOL
    assert (grad - want_grad).abs().max().item() < TOL
    metrics, trl_metrics = clip_ratios(ratio, advantages, mask, eps_low, eps_high), trainer._metrics["train"]
    for key, value in metrics.items():
        assert abs(value - trl_metrics[key][-1]) < TOL, key
    assert metrics["clip_ratio/region_mean"] > 0  # the clip did act on these inputs
    if beta:
        assert abs(float((kl.detach() * mask).sum() / mask.sum()) - trl_metrics["kl"][-1]) < TOL


def test_a_step_of_micro_batches_gives_the_whole_batch_loss():
    """The loop divides a step's summed loss by its summed units: split in two micro-batches of three, grpo,
    dr_grpo (per completion) and dapo (per completion token) give the loss of the whole batch, and bnpo the
    mean of the micro-batches' own token means, as TRL's accumulation does."""
    logps, old, _, mask, advantages = _inputs(6, seed=2)
    halves = (slice(0, 3), slice(3, 6))
    parts = [batch_loss(token_losses(logps[s], old[s], advantages[s])[0], mask[s], "bnpo", 7) for s in halves]
    means = [
        float((token_losses(logps[s], old[s], advantages[s])[0] * mask[s]).sum() / mask[s].sum())
        for s in halves
    ]
    assert abs(float(sum(p[0] for p in parts) / sum(p[1] for p in parts)) - sum(means) / 2) < TOL
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        whole = batch_loss(token_losses(logps, old, advantages)[0], mask, loss_type, MAX_COMPLETION)
        parts = [
            batch_loss(token_losses(logps[s], old[s], advantages[s])[0], mask[s], loss_type, MAX_COMPLETION)
            for s in halves
        ]
        split = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert abs(split.item() - (whole[0] / whole[1]).item()) < TOL, loss_type


def test_without_old_logps_the_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    logps, _, _, mask, advantages = _inputs(4, seed=3)
    x = logps.clone().requires_grad_()
    per_token, _, ratio = token_losses(x, None, advantages)
    assert torch.equal(ratio, torch.ones_like(ratio))
    loss_sum, units = batch_loss(per_token, mask, "grpo", MAX_COMPLETION)
    (grad,) = torch.autograd.grad(loss_sum / units, x)
    want = -advantages[:, None] * mask / mask.sum(-1, keepdim=True) / 4
    assert (grad - want).abs().max().item() < TOL


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_as_trl_computes_them(scale_rewards):
    """TRL's sum_then_normalize path, written out with its own nanstd: a NaN reward (no reward applied) is
    left out of its group's mean and std, and its advantage is 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, float("nan"), 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])
    g = 4
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale_rewards == "group":
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    else:
        std = nanstd(rewards).expand_as(rewards)
    want = rewards - mean
    if scale_rewards != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    got = group_advantages(rewards, g, scale_rewards)
    assert (got - want).abs().max().item() < 1e-5 and got[5] == 0.0
    assert abs(got[4:8].sum().item()) < 1e-4  # the all-equal group's rewards (0.5 x 3) carry no signal


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        batch_loss(torch.zeros(1, 2), torch.ones(1, 2), "ppo", 2)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(torch.zeros(4), 2, "per_token")
    with pytest.raises(ValueError, match="beta > 0 needs"):
        token_losses(torch.zeros(1, 2), None, torch.zeros(1), beta=0.1)
