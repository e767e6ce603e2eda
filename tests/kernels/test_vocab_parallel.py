"""The embedding and lm_head split by vocabulary (kernels/vocab_parallel.py) on two CPU processes (gloo): each
process holds half of the rows, the lookup is bitwise the whole table's, and the frozen head's log-probabilities
and hidden-state gradients (SFT's cross-entropy and the preference losses' per-token log-probs) equal the
unsplit head's, with a different number of rows on each process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")

VOCAB, HIDDEN = 301, 16  # an odd vocabulary: the processes hold 151 and 150 rows


def _model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype).requires_grad_(False)


def _worker(rank: int, port: int, out: str, dtype: torch.dtype) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from llama_lora.kernels.head import LinearCrossEntropy, head_log_probs
    from llama_lora.kernels.vocab_parallel import split
    from llama_lora.train.objectives.preference import LinearLogProbs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    whole = _model(dtype)
    table = whole.get_input_embeddings().weight.detach().clone()
    model = _model(dtype)
    made = split(model, init_device_mesh("cpu", (2,)))
    weight = model.get_input_embeddings().weight
    result = {
        "made": len(made),
        "tied": weight is model.get_output_embeddings().weight,
        "dtensor": isinstance(weight, DTensor),
        "local_rows": weight.to_local().shape[0],
    }
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, VOCAB, (2, 5 + 3 * rank), generator=g)  # 10 and 16 tokens
    result["lookup_equal"] = torch.equal(model.get_input_embeddings()(ids), table[ids])

    n = 7 + 130 * rank  # 7 and 137 labelled rows: different chunk counts alone
    h = torch.randn(n, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, VOCAB, (n,), generator=g)
    loss = LinearCrossEntropy.apply(h, weight, y)
    loss.backward()
    h_ref = h.detach().clone().requires_grad_(True)
    ref = LinearCrossEntropy.apply(h_ref, table, y)
    ref.backward()
    logp, _ = head_log_probs(h.detach(), weight, y, grad=False)
    token = LinearLogProbs.apply(h_ref.detach().requires_grad_(True), weight, y, 16)
    result.update(
        loss=(float(loss.detach()), float(ref.detach())),
        grad_err=float((h.grad.float() - h_ref.grad.float()).abs().max()),
        logp_err=float(
            (
                logp
                + torch.nn.functional.cross_entropy(
                    h.detach().float() @ table.float().t(), y, reduction="none"
                )
            )
            .abs()
            .max()
        ),
        token_grad=token.requires_grad,
    )
    try:
        model.get_output_embeddings()(h.detach())
        result["head_refused"] = False
    except RuntimeError:
        result["head_refused"] = True
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_embedding_and_head_equal_the_whole(tmp_path, dtype):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), dtype), nprocs=2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rank, rows in ((0, 151), (1, 150)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["made"] == 1 and got["tied"] and got["dtensor"], got
        assert got["local_rows"] == rows
        assert got["lookup_equal"], f"rank {rank}: the split lookup differs from the table's"
        loss, ref = got["loss"]
        assert loss == pytest.approx(ref, rel=tol), got
        assert got["grad_err"] <= tol, got
        assert got["logp_err"] <= (1e-4 if dtype == torch.float32 else 0.1), got
        assert got["token_grad"]  # the preference losses' per-token log-probs keep their gradient
        assert got["head_refused"]
