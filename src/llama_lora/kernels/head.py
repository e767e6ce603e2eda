"""The frozen lm_head over labelled positions only, without full logits.

A causal LM head applied to every position builds a batch x length x vocab logits tensor (49k vocab for
SmolLM2, 128k for Llama-3.2) although a loss uses only response tokens. The losses (train/objectives/) gather
the decoder's hidden states at labelled positions first and send only those through lm_head, in chunks
(`chunk_rows`).

The head is frozen (adapters never train it), so a loss needs a gradient for the hidden states only, and
that gradient is known as soon as a chunk's logits are: d loss / d logits = softmax(logits) - onehot(target),
so d loss / d h = (softmax - onehot) @ W. `LinearCrossEntropy` computes it in the forward pass, chunk by
chunk, and keeps only that (n_labelled x hidden) tensor for backward. At most one chunk of logits exists at a
time, and nothing is recomputed: compared with checkpointing each chunk (recompute logits, then autograd's
log-softmax backward) this saves one lm_head matmul and the log-softmax backward per labelled token.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

CHUNK = 512  # most labelled positions per lm_head call
# ... and at most this many bytes of float32 logits per chunk (128 positions for SmolLM2's 49k vocabulary, 49 for
# Llama-3.2's 128k). glibc's malloc serves allocations above 32 MB with fresh mmap()s, which are returned on free
# and page-faulted in again on every use, so larger chunks page-fault on every step (measured: bench/RESULTS.md).
# Chunks below that stay in the reused heap.
CHUNK_BYTES = 24 * 2**20


def chunk_rows(vocab: int) -> int:
    """Labelled positions per lm_head call for a `vocab`-sized head."""
    return min(CHUNK, max(16, CHUNK_BYTES // (4 * vocab)))


# The CPU's float32 matmul h @ W^T with a 49k-row W runs at about half the machine's rate (the library's kernel
# for a transposed right-hand side and a wide output); W @ h^T in blocks of this many vocabulary rows, written
# into a (vocab, n) buffer, runs at about its full rate (bench/RESULTS.md). Other devices and dtypes keep one
# F.linear: they were not measured.
HEAD_BLOCK = 1024


def _head_logits(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The logits of `h` through the frozen head in float32 and their vocabulary dimension: (n, vocab) and 1,
    or, for float32 on the CPU, (vocab, n) and 0 (`HEAD_BLOCK`)."""
    cpu_fp32 = h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32
    if not cpu_fp32 or torch.is_autocast_enabled("cpu"):
        return F.linear(h, weight).float(), 1
    logits = h.new_empty(weight.shape[0], h.shape[0])
    ht = h.t()
    for start in range(0, weight.shape[0], HEAD_BLOCK):
        torch.mm(weight[start : start + HEAD_BLOCK], ht, out=logits[start : start + HEAD_BLOCK])
    return logits, 0


def chunk_log_softmax(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk through a frozen head: log p(y_i | h_i) in float32, and (`grad`) the gradient of the summed
    cross-entropy -sum_i log p(y_i | h_i) with respect to `h`, (softmax - onehot) @ W, in `h`'s dtype. One exp
    serves the log-sum-exp and the softmax (logits formed in the matmul's dtype, bf16 under autocast, then
    taken in float32)."""
    logits, dim = _head_logits(h, weight)
    picked = logits.gather(dim, y.unsqueeze(dim)).squeeze(dim)
    top = logits.amax(dim=dim, keepdim=True)
    e = logits.sub_(top).exp_()  # in place: one exp serves the log-sum-exp and the softmax
    sums = e.sum(dim=dim, keepdim=True)
    logp = picked - sums.log().add_(top).squeeze(dim)
    if not grad:
        return logp, None
    probs = e.div_(sums)
    rows = torch.arange(y.shape[0], device=y.device)
    probs[(rows, y) if dim == 1 else (y, rows)] -= 1.0
    return logp, (probs if dim == 1 else probs.t()).to(weight.dtype) @ weight


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for a frozen W, with d/dh computed chunk by chunk in the forward pass.

    h: (n, hidden), weight: (vocab, hidden), targets: (n,). Logits are formed in the matmul's dtype (bf16 under
    autocast) and the softmax, logsumexp and loss are taken in float32 (`chunk_log_softmax`).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = chunk_rows(weight.shape[0])
        for start in range(0, h.shape[0], rows):
            y = targets[start : start + rows]
            logp, d_h = chunk_log_softmax(h[start : start + rows], weight, y, grad=need_grad)
            total -= logp.sum()
            if need_grad:
                grad[start : start + rows] = d_h
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the lm_head of a causal LM (or of the one inside a PeftModel)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()
