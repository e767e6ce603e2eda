"""KTO (Ethayarajh et al. 2024) as an `Objective` (base.py): single answers labelled desirable or undesirable.

Each example (data/kto.py) is an answer's sequence and its KL sequence: the same prompt followed by another
row's answer. A batch runs the KL rows first, without gradient (TRL detaches the KL estimate, so they would
get none), then the answers; the loss is `preference.kto_loss` (checked against TRL's KTOTrainer in
tests/train/test_preference.py). The reference log-probabilities of both sequences are computed once, before
the first step, as DPO's are (`precompute_reference`). The KL estimate is taken per micro-batch, as TRL takes
it per device batch; TRL then averages it over processes, which a data-parallel run here does not.
"""

from __future__ import annotations

import torch

from llama_lora.train.objectives.preference import ReferencedObjective, kto_loss, model_logps

KL = "kl_"  # the prefix of the KL rows' tensors in a batch


class KTOLoss(torch.nn.Module):
    """forward(input_ids, labels, attention_mask, desirable, ref_logps, ref_kl_logps, kl_*) -> (summed losses,
    examples). With `logps_only`: the answers' and the KL sequences' summed log-probabilities."""

    def __init__(
        self, model: torch.nn.Module, beta: float, desirable_weight: float, undesirable_weight: float
    ):
        super().__init__()
        self.model, self.beta = model, beta
        self.weights = (desirable_weight, undesirable_weight)
        self.sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self.record = True  # off for a data-parallel step's weightless re-run (parallel.my_share)

    def forward(
        self,
        input_ids,
        labels,
        attention_mask=None,
        desirable=None,
        ref_logps=None,
        ref_kl_logps=None,
        logps_only=False,
        **rest,
    ):
        kl_batch = {k.removeprefix(KL): v for k, v in rest.items() if k.startswith(KL)}
        packed = {k: v for k, v in rest.items() if not k.startswith(KL)}
        with torch.no_grad():  # the KL estimate is detached: no gradient flows through these rows
            kl_sums, _ = model_logps(self.model, **kl_batch)
        sums, _ = model_logps(self.model, input_ids, labels, attention_mask, **packed)
        if logps_only:
            return sums, kl_sums
        losses, rewards, kl = kto_loss(
            sums, ref_logps, desirable, kl_sums, ref_kl_logps, self.beta, *self.weights
        )
        self._accumulate(rewards, sums.detach(), desirable.bool(), kl)
        return losses.sum(), sums.shape[0]

    def _accumulate(self, rewards, logps, desirable, kl) -> None:
        if not self.record:
            return
        into = self.sums["train" if self.training else "eval"]
        parts = {
            "rewards/chosen": rewards[desirable].sum(),
            "rewards/rejected": rewards[~desirable].sum(),
            "logps/chosen": logps[desirable].sum(),
            "logps/rejected": logps[~desirable].sum(),
            "chosen": desirable.sum(),
            "rejected": (~desirable).sum(),
            "kl": kl,
            "batches": 1,
        }
        for key, value in parts.items():
            into[key] = into.get(key, 0.0) + float(value)

    KEYS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "chosen", "rejected")

    def take_metrics(self, mode: str = "train", reduce=None) -> dict[str, float]:
        """Means since the last call under TRL's names (desirable answers are TRL's "chosen", undesirable its
        "rejected"; eval ones prefixed `eval_`), then the window restarts. `reduce(*values)` sums over
        processes. The margin is logged when the window held both kinds."""
        sums, self.sums[mode] = self.sums[mode], {}
        values = [sums.get(k, 0.0) for k in (*self.KEYS, "kl", "batches")]
        if reduce is not None:
            values = reduce(*values)
        reward_good, reward_bad, logp_good, logp_bad, good, bad, kl, batches = values
        if not batches:
            return {}
        out = {"kl": kl / batches}
        if good:
            out |= {"rewards/chosen": reward_good / good, "logps/chosen": logp_good / good}
        if bad:
            out |= {"rewards/rejected": reward_bad / bad, "logps/rejected": logp_bad / bad}
        if good and bad:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        prefix = "eval_" if mode == "eval" else ""
        return {prefix + k: v for k, v in out.items()}


class KTOObjective(ReferencedObjective):
    """KTO as an `Objective` (base.py, through preference.ReferencedObjective): `collate` batches the answers
    and their KL sequences, each packed or right-padded; an example is one unit; the reference's summed
    log-probabilities of every answer and KL sequence are kept on the examples."""

    def __init__(
        self,
        model: torch.nn.Module,
        beta: float,
        desirable_weight: float,
        undesirable_weight: float,
        pad_id: int,
        packed: bool = False,
    ):
        self.module = KTOLoss(model, beta, desirable_weight, undesirable_weight)
        self.pad_id, self.packed = pad_id, packed

    def collate(self, examples, with_reference: bool = True) -> dict[str, torch.Tensor]:
        batch = self.rows([e.example for e in examples])
        batch |= {KL + k: v for k, v in self.rows([e.kl for e in examples]).items()}
        batch["desirable"] = torch.tensor([e.desirable for e in examples])
        if with_reference:
            batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float32)
            batch["ref_kl_logps"] = torch.tensor([e.ref_kl for e in examples], dtype=torch.float32)
        return batch

    def keep_reference(self, examples, logps) -> None:
        sums, kl_sums = logps
        for k, example in enumerate(examples):
            example.ref, example.ref_kl = float(sums[k]), float(kl_sums[k])
