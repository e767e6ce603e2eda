"""GRPO's arithmetic (Shao et al. 2024, with DAPO's and Dr. GRPO's variants): group-relative advantages from
rewards, and the clipped surrogate loss over completion tokens, named and normalised as TRL's GRPOTrainer
does (`tests/train/test_grpo.py` checks loss, gradients and clip ratios against TRL 1.16's own code).

Issue 31 builds `train.objective: grpo` on these (sampling with the generation engine, rewards from
train/rewards.py); until then nothing in the trainer calls them.

Per completion token t, with r_t = exp(logp_t - old_logp_t) the importance ratio (1 when the completions are
used for one step only, `num_iterations` 1) and A the completion's advantage:

    loss_t = -min(r_t A, clip(r_t, 1 - epsilon_low, 1 + epsilon_high) A) + beta * KL_t
    KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3, only when beta > 0)

`loss_type` says how the token losses of a batch become one number: `grpo` averages each completion's tokens,
then the completions; `dr_grpo` sums the tokens and divides by completions x max_completion_length; `bnpo`
divides each micro-batch's token sum by its completion tokens, `dapo` by those of the whole step.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation over the values that are not NaN, with Bessel's correction."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nanmean((x - mean) ** 2, dim=dim) * count / (count - 1)
    return var.sqrt()


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", batch_std: float | None = None
) -> torch.Tensor:
    """Each completion's reward minus its group's mean reward (the group: the `num_generations` completions
    of one prompt, consecutive), divided by the group's standard deviation (`group`), the whole batch's
    (`batch`) or nothing (`none`), + 1e-4. A NaN reward (no reward function applied to the completion) is
    left out of its group's statistics, and its advantage is 0: it does not move the policy. `batch_std`: the
    spread of the whole step's rewards where they are split over processes (`batch`)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, not {scale_rewards!r}")
    rewards = rewards.float()
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards == "group" and num_generations > 1:
        advantages = advantages / (_nanstd(groups, dim=1).repeat_interleave(num_generations) + 1e-4)
    elif scale_rewards == "batch" and batch_std is not None:
        advantages = advantages / (batch_std + 1e-4)
    elif scale_rewards == "batch" and rewards.numel() > 1:
        advantages = advantages / (_nanstd(rewards) + 1e-4)
    elif scale_rewards != "none":
        advantages = advantages / 1e-4  # a single value has no spread: TRL divides by 0 + 1e-4 too
    return torch.nan_to_num(advantages, nan=0.0)


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(per-token loss, per-token KL or None, importance ratio), each completions x tokens. `old_logps`
    None: the completions were sampled by the policy as it is (their ratio is 1, its gradient is not)."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, kl, ratio


def batch_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, units): the loss's numerator and denominator for `loss_type`, so that a step's summed
    loss over its micro-batches divided by its summed units is TRL's loss for the step: `dapo` divides by the
    step's completion tokens, `grpo` and `dr_grpo` by its completions, `bnpo` averages each micro-batch over
    its own tokens and the micro-batches with equal weight (TRL divides by the accumulation steps)."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_completion = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_completion.sum(), torch.tensor(float(per_token.shape[0]))
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / max_completion_length, torch.tensor(float(per_token.shape[0]))
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0), torch.tensor(1.0)
    if loss_type == "dapo":
        return (per_token * mask).sum(), mask.sum().clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")


def clip_ratios(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    """The share of completion tokens whose ratio the clip holds, under TRL's names: `low` below 1 -
    epsilon_low with a negative advantage, `high` above 1 + epsilon_high with a positive one, `region` either."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    tokens = mask.sum().clamp(min=1.0)

    def share(x: torch.Tensor) -> float:
        return float((x.float() * mask).sum() / tokens)

    return {
        "clip_ratio/low_mean": share(low),
        "clip_ratio/high_mean": share(high),
        "clip_ratio/region_mean": share(low | high),
    }


def completion_grid(token_logps: torch.Tensor, rows: torch.Tensor, n_rows: int, width: int) -> torch.Tensor:
    """Per-token values of a batch's labelled tokens (in row order, as gathered) laid out completions x
    `width`, each completion's tokens from column 0, zero after its end (differentiable)."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    columns = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    grid = token_logps.new_zeros(n_rows, width)
    return grid.index_put((rows, columns), token_logps)


class GRPOLoss(torch.nn.Module):
    """forward(input_ids, labels, advantages, completion_mask, [old_logps], [ref_logps], ...) -> (summed loss,
    units) for `loss_type` (`batch_loss`). A batch (`GRPOObjective.collate`) holds prompt + completion rows,
    the completion tokens labelled; `completion_mask` (completions x longest completion) is 0 after a
    completion's end and on a truncated completion with `mask_truncated_completions`. The log-probabilities
    are taken at the sampling temperature, as TRL does."""

    def __init__(
        self,
        model,
        loss_type: str,
        epsilon: float,
        epsilon_high: float,
        beta: float,
        temperature: float,
        max_completion_length: int,
    ):
        super().__init__()
        self.model = model
        self.loss_type, self.beta, self.temperature = loss_type, beta, temperature
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.max_completion_length = max_completion_length
        self.recording = True
        self.sums: dict[str, float] = {}

    def token_logps(self, input_ids, labels, width: int, attention_mask=None, **packed) -> torch.Tensor:
        """Each completion token's log-probability (completions x `width`) under the model."""
        from llama_lora.data.encoding import IGNORE
        from llama_lora.kernels.head import chunk_rows, decoder_and_head
        from llama_lora.train.objectives.preference import LinearLogProbs, _chunk_logps

        decoder, head = decoder_and_head(self.model)
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked = hidden[:, :-1][keep] / self.temperature
        chunk = chunk_rows(head.weight.shape[0])
        if not head.weight.requires_grad:
            logps = LinearLogProbs.apply(picked, head.weight, targets[keep], chunk)
        else:
            logps = _chunk_logps(picked, head.weight, targets[keep])
        rows = packed.get("llama_lora_rows")
        if rows is None:
            row_ids, n_rows = keep.nonzero()[:, 0], labels.size(0)
        else:
            row_ids, n_rows = (rows.slots // rows.width)[1:][keep[0]], rows.rows
        return completion_grid(logps, row_ids, n_rows, width)

    def forward(
        self,
        input_ids,
        labels,
        advantages,
        completion_mask,
        attention_mask=None,
        old_logps=None,
        ref_logps=None,
        **packed,
    ):
        logps = self.token_logps(input_ids, labels, completion_mask.shape[1], attention_mask, **packed)
        per_token, kl, ratio = token_losses(
            logps, old_logps, advantages, self.epsilon_low, self.epsilon_high, self.beta, ref_logps
        )
        loss_sum, units = batch_loss(per_token, completion_mask, self.loss_type, self.max_completion_length)
        if self.recording:
            with torch.no_grad():
                mask = completion_mask.float()
                tokens = float(mask.sum())
                add = clip_ratios(ratio, advantages, mask, self.epsilon_low, self.epsilon_high)
                if kl is not None:
                    add["kl"] = float((kl * mask).sum()) / max(tokens, 1.0)
                for key, value in add.items():  # token-weighted, divided by the tokens when taken
                    self.sums[key] = self.sums.get(key, 0.0) + value * tokens
                self.sums["tokens"] = self.sums.get("tokens", 0.0) + tokens
        return loss_sum, units
