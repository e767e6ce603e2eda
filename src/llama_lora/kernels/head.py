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


def head_log_probs(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, grad: bool, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(y_i | h_i) for every row of `h` (float32) and (`grad`) the gradient of the summed cross-entropy
    with respect to `h`, `chunk` rows at a time (default `chunk_rows`). A head split by vocabulary across the
    processes of a sharded run (`vocab_parallel.split`: its weight a DTensor) is taken there."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        return _split_head_log_probs(h, weight, y, grad)
    chunk = chunk or chunk_rows(weight.shape[0])
    logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    d_h = torch.empty_like(h) if grad else None
    for start in range(0, h.shape[0], chunk):
        part, d_part = chunk_log_softmax(h[start : start + chunk], weight, y[start : start + chunk], grad)
        logp[start : start + chunk] = part
        if grad:
            d_h[start : start + chunk] = d_part
    return logp, d_h


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for a frozen W, with d/dh computed chunk by chunk in the forward pass.

    h: (n, hidden), weight: (vocab, hidden), targets: (n,). Logits are formed in the matmul's dtype (bf16 under
    autocast) and the softmax, logsumexp and loss are taken in float32 (`chunk_log_softmax`).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = chunk_rows(weight.shape[0])
        logp, grad = head_log_probs(h, weight, targets, grad=ctx.needs_input_grad[0], chunk=rows)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):  # summed chunk by chunk, as ever (the same float32 total)
            total -= logp[start : start + rows].sum()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def first_row(rows: int, world: int, rank: int) -> int:
    """The first of `rows` that process `rank` of `world` holds under FSDP2's dim-0 split (torch.chunk's:
    ceil(rows / world) rows each, the last pieces shorter or empty)."""
    return min(rank * -(-rows // world), rows)


def shard_rows(weight) -> tuple[torch.Tensor, int]:
    """This process's rows of a DTensor sharded on dim 0 (FSDP2's split) and the index of the first of them
    (for a weight split by vocabulary: the first token id it holds)."""
    mesh = weight.device_mesh
    return weight.to_local(), first_row(weight.shape[0], mesh.size(), mesh.get_local_rank())


def gather_rows(t: torch.Tensor, group, longest: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Every process's `t` (rows along dim 0, as many as each has) stacked in rank order, each padded with
    zeros to the longest: (world x longest, ...), and this process's offset and row count in it. A
    collective: every process calls it. `longest`, where the caller knows it already, spares the
    collective that finds it."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if longest is None:
        count = torch.tensor([t.shape[0]], dtype=torch.int64)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        longest = max(int(c) for c in counts)
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts), rank * longest, t.shape[0]


def _split_head_log_probs(
    h: torch.Tensor, weight, y: torch.Tensor, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`head_log_probs` for a head split by vocabulary across the processes of a sharded run
    (kernels/vocab_parallel.py). Every process takes every process's rows through its own vocabulary rows;
    per row the max and the sum of exponentials are reduced across processes (max, then sum), the target's
    logit comes from the process holding it, and the gradient (softmax - onehot) @ W is summed across them.
    A collective, with as many chunks on every process (their count comes from the gathered total)."""
    import torch.distributed as dist

    local, start = shard_rows(weight)
    group = weight.device_mesh.get_group()
    all_h, mine, n = gather_rows(h.detach(), group)
    all_y, _, _ = gather_rows(y, group, longest=all_h.shape[0] // dist.get_world_size(group))
    logp = torch.empty(all_h.shape[0], dtype=torch.float32, device=h.device)
    d_h = torch.zeros_like(all_h) if grad else None
    rows = chunk_rows(-(-weight.shape[0] // weight.device_mesh.size()))  # alike on every process
    for first in range(0, all_h.shape[0], rows):
        part = slice(first, first + rows)
        logits, dim = _head_logits(all_h[part], local)
        inside = (all_y[part] >= start) & (all_y[part] < start + local.shape[0])
        at = (all_y[part] - start).masked_fill_(~inside, 0)
        picked = logits.gather(dim, at.unsqueeze(dim)).squeeze(dim).masked_fill_(~inside, 0.0)
        top = logits.amax(dim=dim, keepdim=True)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        e = logits.sub_(top).exp_()
        stats = torch.stack([e.sum(dim=dim), picked])
        dist.all_reduce(stats, group=group)
        logp[part] = stats[1] - stats[0].log().add_(top.squeeze(dim))
        if grad:
            probs = e.div_(stats[0].unsqueeze(dim))
            held = inside.nonzero().squeeze(1)
            probs[(held, at[held]) if dim == 1 else (at[held], held)] -= 1.0
            d_h[part] = (probs if dim == 1 else probs.t()).to(local.dtype) @ local
    if grad:
        dist.all_reduce(d_h, group=group)
    return logp[mine : mine + n], d_h[mine : mine + n] if grad else None


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the lm_head of a causal LM (or of the one inside a PeftModel)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model, causal_lm.get_output_embeddings()
