"""The frozen embedding and lm_head of a sharded run split by vocabulary across its processes.

Under FSDP2 the embedding (tied to the lm_head in Llama-3.2 and SmolLM2) would sit in the root group: gathered
whole at every forward and kept through backward, with an all-gather buffer of the same size besides: 2 x 525 MB
for Llama-3.2-1B's 128k x 2048 bf16 table, more than its gathered decoder layer (bench/RESULTS.md). Under
LoRA/DoRA both are frozen, so they need no gradient and need not be gathered at all: each process keeps its
rows of the vocabulary (FSDP2's dim-0 split, ceil(vocab / W) rows each, so shard_loading.py fills them as it
fills any shard) and the processes exchange results, which are small, instead of weights:

    embedding  every process looks all processes' token ids up (gathered: a few KB) in its own rows, zeros for
               ids it does not hold, and the lookups are summed across processes: each position has exactly
               one non-zero term, so every process gets bitwise the lookup of the whole table
    head       the losses' frozen head (head.head_log_probs) takes every process's labelled hidden states
               through each process's rows and reduces the log-softmax's max and sum and its gradient across
               processes (head._split_head_log_probs)

Every process runs these collectives in the same order: every forward of a sharded run runs on all of them,
as FSDP2's gathers need anyway. Nothing else calls the split head (the losses read its weight, never its
forward); a call is refused. Adapter files are unchanged: the embedding and head are not in them.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from llama_lora.kernels.head import decoder_and_head, first_row, gather_rows, shard_rows

__all__ = ["split"]


def split(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Split `model`'s input embedding and lm_head (the same weight where tied) by vocabulary over `mesh`, in
    place, and return their new parameters (DTensors, for FSDP2 to leave alone). Nothing is split, and the
    empty set returned, where they are not a frozen plain nn.Embedding and bias-free nn.Linear (an adapter
    or training on either) or where a process would hold no row. Works on the meta device as on real
    weights (then each process keeps only its rows)."""
    decoder, head = decoder_and_head(model)
    embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    plain = (
        type(embed) is nn.Embedding
        and type(head) is nn.Linear
        and head.bias is None
        and embed.max_norm is None
        and not embed.weight.requires_grad
        and not head.weight.requires_grad
    )
    if not plain or any(
        first_row(w.shape[0], mesh.size(), mesh.size() - 1) >= w.shape[0] for w in (embed.weight, head.weight)
    ):
        return set()
    made: dict[int, nn.Parameter] = {}
    for module in (embed, head):
        weight = module.weight
        if id(weight) not in made:
            made[id(weight)] = nn.Parameter(_shard(weight, mesh), requires_grad=False)
        module.weight = made[id(weight)]
    embed.forward = types.MethodType(_embedding_forward, embed)
    head.forward = types.MethodType(_head_forward, head)
    return set(made.values())


def _shard(weight: torch.Tensor, mesh) -> torch.Tensor:
    """This process's rows of `weight` as a DTensor sharded on dim 0 (the rest dropped)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = weight.shape[0]
    start = first_row(rows, mesh.size(), mesh.get_local_rank())
    local = weight.detach()[start : start + -(-rows // mesh.size())].clone()
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride()
    )


def _embedding_forward(self: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    local, start = shard_rows(self.weight)
    group = self.weight.device_mesh.get_group()
    ids, mine, n = gather_rows(input_ids.reshape(-1), group)
    held = (ids >= start) & (ids < start + local.shape[0])
    out = F.embedding((ids - start).masked_fill_(~held, 0), local).masked_fill_(~held.unsqueeze(-1), 0)
    dist.all_reduce(out, group=group)
    return out[mine : mine + n].reshape(*input_ids.shape, local.shape[1])


def _head_forward(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    raise RuntimeError(
        "this lm_head is split by vocabulary across a sharded run's processes: its logits come only through "
        "the losses (kernels/head.head_log_probs)"
    )
