"""Response-token loss computed only where labels exist.

A causal LM head applied to every position builds a batch x length x vocab logits tensor (49k vocab for
SmolLM2, 128k for Llama-3.2) although the loss uses only response tokens. Here the decoder's hidden states
are gathered at labelled positions first and only those go through lm_head, in chunks. When gradients are
needed each chunk is checkpointed: its logits are recomputed in the backward pass instead of being kept,
so at most one chunk of logits (CHUNK x vocab) exists at a time. That costs one extra lm_head matmul over
the labelled positions and saves about 10 bytes x vocab per labelled token (0.5 MB per token here).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from llama_lora.data import IGNORE

CHUNK = 1024  # labelled positions per lm_head call: 1024 x 49k vocab x 4 bytes = 200 MB of logits


class ResponseLoss(nn.Module):
    """forward(input_ids, attention_mask, labels) -> (sum of token losses, number of labelled tokens).

    Returning the sum (not the mean) lets the caller normalise by the token count of a whole
    gradient-accumulation group, so every response token weighs the same whatever batch it fell into.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a PeftModel (or plain causal LM)

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return causal_lm.model, causal_lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        decoder, lm_head = self._parts()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        picked = hidden[:, :-1][keep]  # (n_labelled, hidden)
        wanted = targets[keep]

        def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(lm_head(h).float(), y, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, picked.shape[0], CHUNK):
            h, y = picked[start : start + CHUNK], wanted[start : start + CHUNK]
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(chunk_loss, h, y, use_reentrant=False)
            else:
                total = total + chunk_loss(h, y)
        return total, keep.sum()


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same quantity through the model's own forward (full logits); used by tests to check ours."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
