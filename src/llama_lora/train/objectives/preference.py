"""Preference-tuning losses (DPO, ORPO, KTO) and the per-sequence log-probabilities they score.

The numerics follow TRL's trainers (tests/test_preference.py checks them against trl 1.16), so losses, rewards
and logged metrics compare one to one with a TRL run. Everything is computed in float32: the losses take
differences of summed log-probabilities, where bfloat16 rounding would swamp the signal.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from llama_lora.data.encoding import IGNORE
from llama_lora.train.objectives.base import FixedExamples


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class LinearLogProbs(torch.autograd.Function):
    """log softmax(h_i @ W^T)[y_i] per position for a frozen W, with d/dh computed in the forward pass.

    The gradient of one token's log-probability with respect to its hidden state is known as soon as its
    logits are: W[y] - softmax @ W. It is computed chunk by chunk and kept (n x hidden, the hidden states'
    dtype); backward only scales it by each token's incoming gradient. Against checkpointing each chunk (see
    head.LinearCrossEntropy for the same trick on the SFT loss) this saves one lm_head matmul per token and
    the log-softmax backward. Logits are formed in the matmul's dtype, log-probabilities taken in float32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        from llama_lora.kernels.head import head_log_probs

        out, grad = head_log_probs(h, weight, targets, grad=ctx.needs_input_grad[0], chunk=chunk)
        ctx.save_for_backward(grad.neg_() if grad is not None else None)  # d logp / d h = -(d CE / d h)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None


def sequence_logps_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int | None = None,
    row_ids: torch.Tensor | None = None,
    n_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens, and how many there are, from the decoder's
    last hidden states and the lm_head weight, without full logits. `labels` has IGNORE (-100) on prompt and
    padding; the causal shift (position t predicts label t + 1) is applied here. Divide the sum by the count
    for ORPO's length-normalised log-probability.

    Only labelled positions go through the head, `chunk` at a time (default: head.chunk_rows, the SFT loss's
    bound on a chunk's logits bytes), so that at most one chunk of logits is
    alive (preference batches hold chosen and rejected rows, so full-vocabulary logits are twice an SFT
    batch's): through `LinearLogProbs` for a frozen head, else each chunk checkpointed. A packed batch
    (packing.collate_packed: hidden 1 x N) gives `row_ids`, the row of each of its N tokens, and `n_rows`.
    """
    from llama_lora.kernels.head import chunk_rows

    chunk = chunk or chunk_rows(weight.shape[0])
    targets = labels[:, 1:]
    mask = targets != IGNORE
    if row_ids is None:
        rows, n_rows = mask.nonzero()[:, 0], labels.size(0)
    else:
        rows = row_ids[1:][mask[0]]
    picked_hidden, picked_targets = hidden[:, :-1][mask], targets[mask]
    if not weight.requires_grad:
        token_logps = LinearLogProbs.apply(picked_hidden, weight, picked_targets, chunk)
    else:
        parts = [
            checkpoint(
                _chunk_logps,
                picked_hidden[i : i + chunk],
                weight,
                picked_targets[i : i + chunk],
                use_reentrant=False,
            )
            for i in range(0, picked_targets.numel(), chunk)
        ]
        token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    counts = torch.zeros(n_rows, dtype=torch.long, device=hidden.device).index_add(
        0, rows, torch.ones_like(rows)
    )
    return sums, counts


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023) per pair, from summed sequence log-probabilities.

    `label_smoothing` is conservative DPO (cDPO): the probability that a pair's preference is flipped, mixing
    in the loss of the reversed pair. At 0 this is TRL 1.x's `loss_type="sigmoid"` exactly; with smoothing it is
    TRL 0.x's sigmoid loss (TRL 1.x applies `label_smoothing` only to its "robust" and "exo_pair" losses).
    Returns (losses, chosen_rewards, rejected_rewards); the rewards beta * (policy - reference) are detached.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    margin = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(margin)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: switch formulas at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024) per pair: chosen NLL minus beta * log sigmoid(log odds ratio).

    The log-probabilities are length-normalised (mean per labelled token), as in the paper and TRL. `chosen_nll`
    is the SFT term, a scalar or one value per pair; its batch mean plus this loss's mean is TRL's total. (TRL
    takes that NLL over prompt and response tokens of the chosen rows; that choice is the caller's.)
    Returns (losses, chosen_rewards, rejected_rewards, log_odds); rewards are beta * mean log-prob, detached.
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach(), log_odds


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) per example, for unpaired data labelled desirable or not.

    The reference point z0 is the batch's KL estimate: the mean policy-minus-reference log-ratio on mismatched
    (prompt, completion) pairs, detached and clamped at 0, as TRL's `loss_type="kto"` estimates it.
    Returns (losses, rewards, kl), losses and rewards in batch order (TRL lists desirable examples first; the
    mean is the same); rewards are beta * (policy - reference), detached.
    """
    kl = (kl_policy_logps.float() - kl_ref_logps.float()).mean().detach().clamp(min=0)
    ratio = policy_logps.float() - ref_logps.float()
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach(), kl


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, under the names TRL logs them.

    `rewards/accuracies` is the fraction of pairs whose chosen reward beats the rejected one (ties count as
    wrong), `rewards/margins` the mean chosen-minus-rejected reward.
    """
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------ the objective


def model_logps(model, input_ids, labels, attention_mask=None, **packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a batch: the summed log-probability of its labelled (response) tokens under `model`, and
    how many there are. `packed`: position_ids and llama_lora_rows of a packed batch (packing.collate_packed)."""
    from llama_lora.kernels.head import decoder_and_head

    decoder, lm_head = decoder_and_head(model)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed
    ).last_hidden_state
    rows = packed.get("llama_lora_rows")
    if rows is None:
        return sequence_logps_from_hidden(hidden, lm_head.weight, labels)
    return sequence_logps_from_hidden(
        hidden, lm_head.weight, labels, row_ids=rows.slots // rows.width, n_rows=rows.rows
    )


class PreferenceLoss(torch.nn.Module):
    """forward(input_ids, labels, attention_mask, ref_logps) -> (summed pair losses, pairs).

    A batch (`PreferenceObjective.collate`) holds n chosen rows, then the n rejected rows of the same pairs,
    so both answers of a pair go through the model in one forward pass. Log-probabilities are summed over
    response tokens only (labels mask the prompt). DPO's reference log-probabilities come with the batch:
    they are computed once, before the first step (`precompute_reference`). Reward statistics accumulate per
    mode (train / eval) until `take_metrics`."""

    def __init__(self, model: torch.nn.Module, kind: str, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.kind, self.beta, self.label_smoothing = model, kind, beta, label_smoothing
        self.sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self.record = True  # off for a data-parallel step's weightless re-run (parallel.my_share)

    def logps(self, input_ids, labels, attention_mask=None, **packed) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs and response token counts per row (chosen rows, then rejected)."""
        return model_logps(self.model, input_ids, labels, attention_mask, **packed)

    def forward(self, input_ids, labels, attention_mask=None, ref_logps=None, logps_only=False, **packed):
        """The summed pair losses and the pair count; with `logps_only`, `logps` (through forward, so that
        a sharded model gathers its weights for it)."""
        sums, counts = self.logps(input_ids, labels, attention_mask, **packed)
        if logps_only:
            return sums, counts
        n = sums.shape[0] // 2
        if self.kind == "dpo":
            ref = ref_logps.float()
            losses, chosen, rejected = dpo_loss(
                sums[:n], sums[n:], ref[:n], ref[n:], self.beta, self.label_smoothing
            )
        else:  # orpo: the chosen answer's mean token NLL plus the odds-ratio term
            means = sums / counts.clamp(min=1)
            losses, chosen, rejected, _ = orpo_loss(means[:n], means[n:], -means[:n], self.beta)
        self._accumulate(chosen, rejected, sums[:n].detach(), sums[n:].detach())
        return losses.sum(), n

    def _accumulate(self, chosen, rejected, policy_chosen, policy_rejected) -> None:
        if not self.record:
            return
        into = self.sums["train" if self.training else "eval"]
        parts = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "logps/chosen": policy_chosen.sum(),
            "logps/rejected": policy_rejected.sum(),
        }
        for key, value in parts.items():
            into[key] = into.get(key, 0.0) + float(value)
        into["pairs"] = into.get("pairs", 0.0) + chosen.numel()

    KEYS = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    )

    def take_metrics(self, mode: str = "train", reduce=None) -> dict[str, float]:
        """Means since the last call, TRL's names (eval ones prefixed `eval_`); then the window restarts.
        `reduce(*values)` sums values over the processes of a data-parallel run (every process calls it)."""
        sums, self.sums[mode] = self.sums[mode], {}
        values = [sums.get(k, 0.0) for k in (*self.KEYS, "pairs")]
        if reduce is not None:
            values = reduce(*values)
        *totals, pairs = values
        prefix = "eval_" if mode == "eval" else ""
        return {prefix + k: v / pairs for k, v in zip(self.KEYS, totals)} if pairs else {}


class ReferencedObjective(FixedExamples):
    """What the objectives that score whole answers share (DPO/ORPO here, KTO in kto.py): an example is one
    unit, evaluation batches come in a fixed order, the loss module records the metrics, rows are batched
    packed (the fast path's packing: one sequence, attention kept per row) or right-padded, and the
    reference's log-probabilities are computed once, before the first step. A subclass sets `module`,
    `pad_id`, `packed`, writes `collate(examples, with_reference)` and `keep_reference`, and says in
    `needs_reference` whether it has a reference."""

    module: torch.nn.Module
    pad_id: int
    packed: bool
    needs_reference = True

    def rows(self, rows) -> dict[str, torch.Tensor]:
        """Tokenized rows as one batch, packed or right-padded."""
        from llama_lora.data.batching import collate
        from llama_lora.kernels.packing import collate_packed

        return collate_packed(rows) if self.packed else collate(rows, self.pad_id)

    def collate(self, examples, with_reference: bool = True) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def keep_reference(self, examples, logps) -> None:
        """Store on `examples` what `module(..., logps_only=True)` returned for their batch."""
        raise NotImplementedError

    @staticmethod
    def units(example) -> int:
        return 1

    def eval_batches(
        self, examples, batch_size: int, max_batch_tokens: int | None
    ) -> list[dict[str, torch.Tensor]]:
        plan = fixed_plan(examples, batch_size, max_batch_tokens)
        return [self.collate([examples[i] for i in b]) for b in plan]

    def take_metrics(self, mode: str = "train", reduce=None) -> dict[str, float]:
        return self.module.take_metrics(mode, reduce)

    def recording(self, on: bool) -> None:
        self.module.record = on

    @torch.no_grad()
    def precompute_reference(
        self, examples, batch_size: int, max_batch_tokens: int | None, device, done=None
    ) -> None:
        """The reference's log-probabilities of every example under the model as it is now (before the first
        step: the base with a fresh adapter, or the adapter training starts from), in eval mode, kept on the
        examples. Computed again identically on --resume, since `attach` runs before a checkpoint is
        restored. `done(n)` is told of each batch's n examples (a progress bar)."""
        if not self.needs_reference or not examples:
            return
        was_training = self.module.training
        self.module.eval()
        for b in fixed_plan(examples, batch_size, max_batch_tokens):
            chosen = [examples[i] for i in b]
            batch = self.collate(chosen, with_reference=False)
            self.keep_reference(
                chosen, self.module(**{k: v.to(device) for k, v in batch.items()}, logps_only=True)
            )
            if done is not None:
                done(len(chosen))
        self.module.train(was_training)


class PreferenceObjective(ReferencedObjective):
    """DPO or ORPO as an `Objective` (base.py): `collate` puts pairs in one batch, chosen rows first (2n
    answers, packed or padded, the sums taken per row); a pair is one unit. Only DPO has a reference."""

    def __init__(
        self,
        model: torch.nn.Module,
        kind: str,
        beta: float,
        label_smoothing: float,
        pad_id: int,
        packed: bool = False,
    ):
        self.module = PreferenceLoss(model, kind, beta, label_smoothing)
        self.kind, self.pad_id, self.packed = kind, pad_id, packed
        self.needs_reference = kind == "dpo"

    def collate(self, pairs, with_reference: bool = True) -> dict[str, torch.Tensor]:
        batch = self.rows([p.chosen for p in pairs] + [p.rejected for p in pairs])
        if self.needs_reference and with_reference:
            refs = [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
            batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
        return batch

    def keep_reference(self, pairs, logps) -> None:
        sums, _ = logps
        n = len(pairs)
        for k, pair in enumerate(pairs):
            pair.ref_chosen, pair.ref_rejected = float(sums[k]), float(sums[n + k])


def fixed_plan(pairs, batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Pairs in a fixed order (the unshuffled plan, seed 0), as evaluation batches them."""
    from llama_lora.data.batching import plan_batches

    return plan_batches([len(p) for p in pairs], batch_size, max_batch_tokens, seed=0, shuffle=False)
