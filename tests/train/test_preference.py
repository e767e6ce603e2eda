"""Preference losses against TRL's own trainers (trl 1.16): values, rewards, metrics and parameter gradients.

TRL 1.x has no free-standing DPO/KTO loss functions: the losses are written inline in the trainers'
`_compute_loss`, and ORPO's lives in `ORPOTrainer.odds_ratio_loss` / `get_batch_loss_metrics`. Building a real
trainer needs datasets, a tokenizer and a TrainingArguments run directory, so `_stub` makes a bare instance with
`object.__new__` and sets only the attributes those methods read; TRL's methods then run unmodified. Models go in
either patched by TRL's own `add_fused_lm_head` (so TRL computes the per-token log-probabilities itself) or, for
the value tests, as `_TableModel`, which returns given sequence log-probabilities in the same output format.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llama_lora.data.encoding import IGNORE
from llama_lora.train.objectives.preference import (
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_metrics,
    sequence_logps_from_hidden,
)
from tests.conftest import tiny_llama


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle for sequence_logps_from_hidden: per row, the summed log-probability of the labelled tokens
    and how many there are, from full logits.

    `logits` is batch x length x vocab, `labels` batch x length with IGNORE (-100) on prompt and padding; the
    causal shift (position t predicts label t + 1) is applied here. Divide the sum by the count for ORPO's
    length-normalised log-probability.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token_logps, 0.0).sum(-1), mask.sum(-1)


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import
trl = pytest.importorskip("trl", minversion="1.16")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

TOL = 1e-5
ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
)


def _stub(cls, **attrs):
    """An instance of a TRL trainer class with only `attrs` set, for calling its loss methods."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(
        accelerator=ACCELERATOR,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )
    return trainer


def _dpo_stub(model, beta, ref_model=None):
    return _stub(
        DPOTrainer,
        model=model,
        ref_model=ref_model,
        beta=beta,
        label_smoothing=0.0,
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        use_weighting=False,
        precompute_ref_logps=ref_model is None,
    )


def _last(trainer) -> dict[str, float]:
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


class _TableModel(torch.nn.Module):
    """Stands in for a TRL fused-head model: row i with input_ids[i, 0] == j gets sequence log-prob values[j]."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    def forward(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        log_probs = self.values[input_ids[:, 0]].unsqueeze(1)  # batch x (length 2 - 1)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _rand_logps(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 40 + 1) for _ in range(4)]


def _maxdiff(a, b) -> float:
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_matches_cpo_sigmoid_loss(beta, label_smoothing):
    """cDPO equals TRL's CPO sigmoid loss applied to the policy-minus-reference log-ratios, per pair."""
    pc, pr, rc, rr = _rand_logps(8, seed=1)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    cpo = _stub(CPOTrainer, beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid", alpha=0.0)
    want_losses, want_chosen, want_rejected = cpo.cpo_loss(pc - rc, pr - rr)
    assert _maxdiff(losses, want_losses) < TOL
    assert _maxdiff(chosen, want_chosen) < TOL and _maxdiff(rejected, want_rejected) < TOL


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_dpo_trainer(beta):
    """Per pair and as a batch: loss, its gradient and the logged reward metrics of DPOTrainer's sigmoid loss."""
    pc, pr, rc, rr = _rand_logps(6, seed=2)
    n = pc.numel()
    for i in range(n):
        values = torch.stack([pc[i], pr[i]])
        trainer = _dpo_stub(_TableModel(values), beta)
        inputs = {
            "input_ids": torch.tensor([[0, 0], [1, 0]]),
            "attention_mask": torch.ones(2, 2, dtype=torch.long),
            "completion_mask": torch.ones(2, 2, dtype=torch.long),
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        want = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
        losses, chosen, rejected = dpo_loss(
            pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta=beta
        )
        assert _maxdiff(losses[0], want) < TOL
        assert abs(chosen.item() - _last(trainer)["rewards/chosen"]) < TOL
        assert abs(rejected.item() - _last(trainer)["rewards/rejected"]) < TOL

    values = torch.cat([pc, pr]).requires_grad_()
    trainer = _dpo_stub(_TableModel(values), beta)
    inputs = {
        "input_ids": torch.stack([torch.arange(2 * n), torch.zeros(2 * n, dtype=torch.long)], 1),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "completion_mask": torch.ones(2 * n, 2, dtype=torch.long),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    want = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    (want_grad,) = torch.autograd.grad(want, values)
    ours = values.detach().clone().requires_grad_()
    losses, chosen, rejected = dpo_loss(ours[:n], ours[n:], rc, rr, beta=beta)
    (grad,) = torch.autograd.grad(losses.mean(), ours)
    assert _maxdiff(losses.mean(), want) < TOL and _maxdiff(grad, want_grad) < TOL
    metrics, trl_metrics = preference_metrics(chosen, rejected), _last(trainer)
    for key, value in metrics.items():
        assert abs(value - trl_metrics[key]) < TOL, key


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_odds_ratio_loss(beta):
    """Both log1mexp branches: mean log-probs near 0 and well below -log 2."""
    g = torch.Generator().manual_seed(3)
    chosen = -torch.cat([torch.rand(4, generator=g) * 0.5 + 1e-3, torch.rand(4, generator=g) * 5 + 0.7])
    rejected = -torch.cat([torch.rand(4, generator=g) * 5 + 0.7, torch.rand(4, generator=g) * 0.5 + 1e-3])
    nll = torch.tensor(2.5)
    losses, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen, rejected, nll, beta=beta)
    orpo = _stub(ORPOTrainer, beta=beta)
    ratio_term, want_chosen, want_rejected, mean_ratio, mean_log_odds = orpo.odds_ratio_loss(chosen, rejected)
    assert _maxdiff(nll - losses, ratio_term) < TOL  # TRL returns +beta * ratio and subtracts its mean
    assert _maxdiff(losses.mean(), nll - ratio_term.mean()) < TOL
    assert _maxdiff(log_odds.mean(), mean_log_odds) < TOL
    assert _maxdiff(chosen_rewards, want_chosen) < TOL and _maxdiff(rejected_rewards, want_rejected) < TOL


@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # a negative KL estimate is clamped to 0
def test_kto_matches_kto_trainer(kl_sign):
    g = torch.Generator().manual_seed(4)
    n = 6
    policy, ref = -(torch.rand(n, generator=g) * 30 + 1), -(torch.rand(n, generator=g) * 30 + 1)
    kl_ref = -(torch.rand(n, generator=g) * 30 + 5)
    kl_policy = kl_ref + kl_sign * torch.rand(n, generator=g) * 3
    desirable = torch.tensor([True, False, True, True, False, False])
    values = torch.cat([policy, kl_policy]).requires_grad_()
    trainer = _stub(
        KTOTrainer,
        model=_TableModel(values),
        ref_model=None,
        beta=0.1,
        loss_type="kto",
        desirable_weight=1.0,
        undesirable_weight=1.33,
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {
        "input_ids": torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1),
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": torch.stack([torch.arange(n, 2 * n), torch.zeros(n, dtype=torch.long)], 1),
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    want = KTOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    (want_grad,) = torch.autograd.grad(want, values)
    ours = policy.clone().requires_grad_()
    losses, rewards, kl = kto_loss(ours, ref, desirable, kl_policy, kl_ref, beta=0.1, undesirable_weight=1.33)
    (grad,) = torch.autograd.grad(losses.mean(), ours)
    trl_metrics = _last(trainer)
    assert _maxdiff(losses.mean(), want) < TOL and _maxdiff(grad, want_grad[:n]) < TOL
    assert abs(kl.item() - trl_metrics["kl"]) < TOL
    assert abs(rewards[desirable].mean().item() - trl_metrics["rewards/chosen"]) < TOL
    assert abs(rewards[~desirable].mean().item() - trl_metrics["rewards/rejected"]) < TOL


def test_sequence_logps_against_token_loop():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE  # prompt
    labels[1, 5:] = IGNORE  # right padding
    labels[2, :] = IGNORE  # nothing labelled
    sums, counts = sequence_logps(logits, labels)
    for row in range(3):
        want, n = 0.0, 0
        for t in range(1, 7):
            if labels[row, t] != IGNORE:
                want += torch.log_softmax(logits[row, t - 1].double(), -1)[labels[row, t]].item()
                n += 1
        assert abs(sums[row].item() - want) < TOL and counts[row].item() == n
    assert sums[2].item() == 0.0


def test_sequence_logps_from_hidden_matches_logits():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[:, :4] = IGNORE
    want, want_n = sequence_logps(hidden @ weight.T, labels)
    upstream = torch.tensor([0.7, -1.3])  # per-row gradients, as DPO's loss sends them
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), hidden)
    for trainable in (False, True):  # a frozen head (LinearLogProbs) and a trainable one (checkpointed)
        w = weight.clone().requires_grad_(trainable)
        got, n = sequence_logps_from_hidden(hidden, w, labels, chunk=3)
        (grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
        assert torch.equal(n, want_n) and _maxdiff(got, want) < TOL and _maxdiff(grad, want_grad) < TOL


# Two pairs of (prompt, chosen, rejected) token ids of different lengths, right-padded with pad id 0.
PAIRS = [([5, 17, 33], [40, 41, 42, 43], [50, 51]), ([7, 8], [60, 61], [70, 71, 72, 73, 74])]


def _pack(completions: list[tuple[list[int], list[int]]], width: int):
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(completions):
        seq = prompt + answer
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        completion[i, len(prompt) : len(seq)] = 1
    return ids, attention, completion


def _models():
    ref = tiny_llama().requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True)
    with torch.no_grad():  # move the policy off the reference so the log-ratios are not all zero
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy, ref


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _max_grad_diff(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    return max(
        ((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp(min=1e-8)).item() for k in ours
    )


def test_dpo_gradients_match_dpo_trainer():
    """A tiny Llama: our logps + dpo_loss vs DPOTrainer's fused-head log-probs and loss, parameter by parameter."""
    policy, ref = _models()
    width = max(len(p) + max(len(c), len(r)) for p, c, r in PAIRS)
    batch = [(p, c) for p, c, _ in PAIRS] + [
        (p, r) for p, _, r in PAIRS
    ]  # TRL's layout: chosen rows, then rejected
    ids, attention, completion = _pack(batch, width)
    labels = ids.masked_fill(completion == 0, IGNORE)

    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(trl_ref)
    trainer = _dpo_stub(trl_policy, beta=0.1, ref_model=trl_ref)
    inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    want = DPOTrainer._compute_loss(trainer, trl_policy, inputs, return_outputs=False)
    want.backward()

    logps, _ = sequence_logps(policy(input_ids=ids, attention_mask=attention).logits, labels)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref(input_ids=ids, attention_mask=attention).logits, labels)
    losses, chosen, rejected = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.1)
    losses.mean().backward()

    assert abs(losses.mean().item() - want.item()) < TOL
    assert _max_grad_diff(_grads(policy), _grads(trl_policy)) < TOL
    metrics, trl_metrics = preference_metrics(chosen, rejected), _last(trainer)
    for key, value in metrics.items():
        assert abs(value - trl_metrics[key]) < TOL, key


def test_orpo_gradients_match_orpo_trainer():
    """A tiny Llama: our logps + orpo_loss vs ORPOTrainer.get_batch_loss_metrics on plain logits."""
    policy, _ = _models()
    trl_policy = copy.deepcopy(policy)
    width = max(len(p) + max(len(c), len(r)) for p, c, r in PAIRS)
    chosen_ids, chosen_att, chosen_comp = _pack([(p, c) for p, c, _ in PAIRS], width)
    rejected_ids, rejected_att, rejected_comp = _pack([(p, r) for p, _, r in PAIRS], width)
    batch = {
        "chosen_input_ids": chosen_ids,
        "chosen_attention_mask": chosen_att,
        "chosen_labels": chosen_ids.masked_fill(chosen_comp == 0, IGNORE),
        "rejected_input_ids": rejected_ids,
        "rejected_attention_mask": rejected_att,
        "rejected_labels": rejected_ids.masked_fill(rejected_comp == 0, IGNORE),
    }
    trainer = _stub(ORPOTrainer, beta=0.1, is_encoder_decoder=False, padding_value=0)
    want, trl_metrics = ORPOTrainer.get_batch_loss_metrics(trainer, trl_policy, batch)
    want.backward()

    ids = torch.cat([chosen_ids, rejected_ids])
    logits = policy(input_ids=ids, attention_mask=torch.cat([chosen_att, rejected_att])).logits
    sums, counts = sequence_logps(logits, torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    mean_chosen, mean_rejected = (sums / counts).chunk(2)
    # TRL's SFT term: token-mean NLL over every attended token (prompt and response) of the chosen rows.
    nll_sums, nll_counts = sequence_logps(logits[:2], chosen_ids.masked_fill(chosen_att == 0, IGNORE))
    nll = -nll_sums.sum() / nll_counts.sum()
    losses, chosen, rejected, log_odds = orpo_loss(mean_chosen, mean_rejected, nll, beta=0.1)
    losses.mean().backward()

    assert abs(losses.mean().item() - want.item()) < TOL
    assert abs(log_odds.mean().item() - trl_metrics["log_odds_chosen"]) < TOL
    assert _max_grad_diff(_grads(policy), _grads(trl_policy)) < TOL
    for key, value in preference_metrics(chosen, rejected).items():
        assert abs(value - trl_metrics[key]) < TOL, key


def test_kto_gradients_match_kto_trainer():
    """A tiny Llama: our KTO loss module (KL rows without gradient, answers with it) vs KTOTrainer's
    `_compute_loss` with its reference model and fused-head log-probs: loss, parameter gradients, KL and
    the reward metrics. The KL sequences rotate the answers by one, as TRL builds them."""
    from llama_lora.train.objectives.kto import KTOLoss
    from llama_lora.train.objectives.preference import model_logps

    policy, ref = _models()
    rows = [(p, c, True) for p, c, _ in PAIRS] + [(p, r, False) for p, _, r in PAIRS]
    answers = [(p, a) for p, a, _ in rows]
    kl_rows = [(p, answers[i - 1][1]) for i, (p, _) in enumerate(answers)]
    width = max(len(p) + len(a) for p, a in answers + kl_rows)
    ids, attention, completion = _pack(answers, width)
    kl_ids, kl_attention, kl_completion = _pack(kl_rows, width)
    desirable = torch.tensor([good for _, _, good in rows])

    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(ref)
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits"))
    add_fused_lm_head(trl_ref)
    trainer = _stub(
        KTOTrainer,
        model=trl_policy,
        ref_model=trl_ref,
        beta=0.1,
        loss_type="kto",
        desirable_weight=1.0,
        undesirable_weight=1.33,
        calculate_KL=True,
        precompute_ref_logps=False,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": desirable,
    }
    want = KTOTrainer._compute_loss(trainer, trl_policy, inputs, return_outputs=False)
    want.backward()

    labels = ids.masked_fill(completion == 0, IGNORE)
    kl_labels = kl_ids.masked_fill(kl_completion == 0, IGNORE)
    with torch.no_grad():
        ref_logps, _ = model_logps(ref, ids, labels, attention)
        ref_kl_logps, _ = model_logps(ref, kl_ids, kl_labels, kl_attention)
    module = KTOLoss(policy, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    loss_sum, n = module(
        ids,
        labels,
        attention,
        desirable=desirable,
        ref_logps=ref_logps,
        ref_kl_logps=ref_kl_logps,
        kl_input_ids=kl_ids,
        kl_labels=kl_labels,
        kl_attention_mask=kl_attention,
    )
    (loss_sum / n).backward()

    assert n == len(rows) and abs((loss_sum / n).item() - want.item()) < TOL
    assert _max_grad_diff(_grads(policy), _grads(trl_policy)) < TOL
    ours, theirs = module.take_metrics(), _last(trainer)
    for key in (
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "rewards/margins",
    ):
        assert abs(ours[key] - theirs[key]) < TOL, key
    assert ours["kl"] > 0  # the policy was moved off the reference: the clamp is not what makes them agree
