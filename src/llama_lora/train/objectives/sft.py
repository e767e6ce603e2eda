"""Supervised fine-tuning: the response-token loss as an `Objective` (base.py), and `eval_sums`, the one
evaluation every objective and `compare` go through.

`ResponseLoss` gathers the decoder's hidden states at labelled positions first and only those go through the
frozen lm_head, in chunks, with the cross-entropy gradient formed in the forward pass (kernels/head.py): no
batch x length x vocab logits tensor is ever built. A head that does require gradients (not something
llama-lora trains) takes a plain checkpointed path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from llama_lora.data.encoding import IGNORE
from llama_lora.kernels.head import LinearCrossEntropy, chunk_rows, decoder_and_head
from llama_lora.train.objectives.base import FixedExamples


class ResponseLoss(nn.Module):
    """forward(input_ids, labels, attention_mask) -> (sum of token losses, number of labelled tokens).

    A packed batch (packing.collate_packed) passes position_ids and llama_lora_rows instead of a mask.

    Returning the sum (not the mean) lets the caller normalise by the token count of a whole
    gradient-accumulation group, so every response token weighs the same whatever batch it fell into.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a PeftModel (or plain causal LM)

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        return decoder_and_head(self.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **packed,  # position_ids and llama_lora_rows of a packed batch (packing.collate_packed)
    ):
        decoder, lm_head = self._parts()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked = hidden[:, :-1][keep]  # (n_labelled, hidden)
        wanted = targets[keep]

        if not lm_head.weight.requires_grad and getattr(lm_head, "bias", None) is None:
            return LinearCrossEntropy.apply(picked, lm_head.weight, wanted), keep.sum()

        def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        rows = chunk_rows(lm_head.weight.shape[0])
        for start in range(0, picked.shape[0], rows):
            h, y = picked[start : start + rows], wanted[start : start + rows]
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss(h, y)
        return total, keep.sum()


class ResponseObjective(FixedExamples):
    """Supervised fine-tuning as an `Objective` (base.py): the response-token loss; a step's summed loss is
    divided by the response tokens of its examples."""

    def __init__(self, model: nn.Module, collate, pad_id: int = 0):
        self.module = ResponseLoss(model)
        self.collate = collate
        self.pad_id = pad_id

    @staticmethod
    def units(example) -> int:
        return sum(1 for y in example.labels[1:] if y != IGNORE)

    def eval_batches(
        self, examples, batch_size: int, max_batch_tokens: int | None
    ) -> list[dict[str, torch.Tensor]]:
        from llama_lora.data.batching import eval_batches

        return eval_batches(examples, batch_size, max_batch_tokens, self.pad_id)

    def take_metrics(self, mode: str = "train", reduce=None) -> dict[str, float]:
        return {}  # the loss is all SFT logs

    def recording(self, on: bool) -> None:
        pass  # nothing recorded besides the loss


@torch.no_grad()
def eval_sums(loss_fn, batches: list[dict[str, torch.Tensor]], device) -> tuple[float, int]:
    """Summed response-token loss and the number of those tokens over `batches`."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_fn(**{k: v.to(device) for k, v in batch.items()})
        total += float(s)
        count += int(n)
    loss_fn.train(was_training)
    return total, count
