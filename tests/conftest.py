"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-weight Llama built around it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@contextlib.contextmanager
def environment_kept():
    """os.environ as it was on entry, again on exit: the CLI quiets libraries through the environment
    (TQDM_DISABLE, ...), and later subprocesses (run_cli) must start as the user's shell would."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if os.environ != saved:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment, also after a test that runs `cli.main()` in this process
    itself: test files are spread over processes, so any test may come next in this one."""
    with environment_kept():
        yield


# The tiny Llama shape of every test model: 2 layers, hidden 64, 4 query / 2 key-value heads.
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_llama():
    """A 2-layer random float32 Llama (vocab 256, hidden 64, 4 query / 2 key-value heads), seeded: for layer tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, **TINY_SHAPE)).float()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory (converted once into the cache)."""
    from llama_lora.model import loader

    return Path(loader.local_path(loader.resolve("smollm2-135m-instruct"), log=lambda *a: None))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template; trains in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = [
        {"instruction": f"Say the number {i} in words.", "input": "", "output": f"The number is {i}."}
        for i in range(24)
    ] + [{"instruction": "Repeat the text.", "input": f"hello {i}", "output": f"hello {i}"} for i in range(8)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(model_dir: Path, data: Path | str, out: Path, **extra) -> list[str]:
    items = {
        "model.name": str(model_dir),
        "data.source": str(data),
        "data.max_length": 128,
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.logging_steps": 1,
        "train.save_steps": None,
        "train.precision": "fp32",
        "train.learning_rate": 1e-3,
        "peft.r": 4,
        "peft.lora_alpha": 8,
        "peft.lora_dropout": 0.0,
        "output.dir": str(out),
    }
    items.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in items.items()]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama_lora", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cli_in_process(*args: str) -> tuple[int, str, str]:
    """`llama-lora ARGS` run in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    import io
    import warnings

    from llama_lora import cli

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["llama-lora", *args]
    code = 0
    try:
        with (
            environment_kept(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`run_cli`'s result without a new interpreter (seconds less per call): for commands whose outcome
    does not depend on being a separate process (errors, reports, listings)."""
    code, out, err = cli_in_process(*args)
    return subprocess.CompletedProcess(["llama-lora", *args], code, out, err)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """20 preference pairs (prompt, chosen, rejected) as JSONL."""
    rows = [
        {
            "prompt": f"What is {i} plus one?",
            "chosen": f"{i} plus one is {i + 1}.",
            "rejected": f"I do not like numbers like {i}.",
        }
        for i in range(20)
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
