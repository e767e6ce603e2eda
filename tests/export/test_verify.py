"""The verification kit shared by merge and both GGUF exports, its llama.cpp path, and run_dir.atomic_file."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from llama_lora import run_dir
from llama_lora.export import llamacpp, verify
from llama_lora.infer.generate import greedy_probe


def test_agreement_counts_up_to_the_first_divergence():
    assert verify.agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert verify.agreement([[1, 9, 3]], [[1, 2, 3]]) == pytest.approx(1 / 3)
    assert verify.agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5  # the longer one counts
    assert verify.agreement([], []) == 1.0


def test_merge_figures_and_failure_line():
    ref = [torch.zeros(2, 3)]
    ok = verify.merge_figures(ref, [[1, 2]], [torch.full((2, 3), 1e-4)], [[1, 2]], "float32")
    assert ok == {
        "max_abs_logit_diff": pytest.approx(1e-4),
        "greedy_token_agreement": 1.0,
        "tolerance": 1e-3,
        "min_agreement": 1.0,
        "passed": True,
    }
    bad = verify.merge_figures(ref, [[1, 2]], [torch.full((2, 3), 0.5)], [[1, 3]], "float32")
    assert not bad["passed"]
    with pytest.raises(verify.ExportCheckError) as caught:
        verify.require_passed(
            bad, verify.ExportCheckError, "merge", Path("m"), Path("r.json"), verify.merge_failure
        )
    assert str(caught.value) == (
        "merge check failed: max |logit diff| 0.5 (tolerance 0.001), greedy agreement 50.00% (need 100%); "
        "nothing written to m (report in r.json)"
    )
    verify.require_passed(ok, verify.ExportCheckError, "merge", Path("m"), None, verify.merge_failure)


def test_gguf_failure_line_without_a_kept_report():
    ref = [torch.tensor([[10.0, 0.0]])]
    report = verify.figures(ref, [[1]], [torch.tensor([[9.0, 0.0]])], [[1]], ["Hello world!"], "f16")
    assert not report["passed"] and report["relative_logit_diff"] == pytest.approx(0.1)
    with pytest.raises(verify.ExportCheckError, match=r"; nothing written to x.gguf$") as caught:
        verify.require_passed(report, verify.ExportCheckError, "GGUF", Path("x.gguf"), None)
    assert str(caught.value).startswith("GGUF check failed: tokenizer round trip False ['Hello world!'], ")


def test_atomic_file_places_only_what_succeeded(tmp_path):
    target = tmp_path / "model.gguf"
    with run_dir.atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".gguf" and tmp.name.startswith(".model.tmp-")
        tmp.write_text("first")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with pytest.raises(RuntimeError), run_dir.atomic_file(target) as tmp:
        tmp.write_text("second")
        raise RuntimeError("check failed")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    run_dir.write_text_atomic(tmp_path / "Modelfile", "FROM ./model.gguf\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model.gguf"]


@pytest.fixture
def fake_llama_cpp(monkeypatch, tiny_model_dir, tokenizer):
    """llama-cpp-python stood in for by the tiny model itself: llama.cpp's calls, transformers' numbers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    class Llama:
        def __init__(self, model_path, lora_path, n_ctx, **kwargs):
            if Path(model_path).name == "broken.gguf":
                raise ValueError("Failed to load model from file")
            self.ids: list[int] = []

        def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
            return tokenizer.encode(text.decode(), add_special_tokens=False)

        def reset(self) -> None:
            self.ids = []

        def eval(self, ids) -> None:
            self.ids += list(ids)
            with torch.no_grad():
                self.scores = model(torch.tensor([self.ids])).logits[0].numpy()

        @property
        def n_tokens(self) -> int:
            return len(self.ids)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    return model


def test_llama_cpp_is_the_second_verifier(fake_llama_cpp, tokenizer):
    prompts = [verify.chat_ids(tokenizer, p) for p in verify.PROBES[:2]]
    reference = greedy_probe(fake_llama_cpp, prompts, 5)
    logged = []
    check = {"passed": True, "verifiers": ["transformers"]}
    check = verify.add_llamacpp(check, Path("m.gguf"), prompts, reference, tokenizer, "f16", 5, logged.append)
    assert logged == ["loading the GGUF file in llama.cpp and probing it ..."]
    assert check["verifiers"] == ["transformers", "llama.cpp"] and check["passed"]
    lc = check["llama_cpp"]
    assert lc["passed"] and lc["tokenizer_round_trip"] and lc["greedy_token_agreement"] == 1.0
    assert lc["max_abs_logit_diff"] < 1e-4 and lc["probe_new_tokens"] == 5


def test_llama_cpp_load_failure_fails_the_check(fake_llama_cpp, tokenizer):
    prompts = [verify.chat_ids(tokenizer, verify.PROBES[0])]
    reference = greedy_probe(fake_llama_cpp, prompts, 2)
    logged = []
    check = verify.figures(*reference, *reference, [], "f16") | {"verifiers": ["transformers"]}
    args = (prompts, reference, tokenizer, "f16", 2, logged.append)
    check = verify.add_llamacpp(check, Path("broken.gguf"), *args, lora_path=Path("adapter.gguf"))
    assert logged == ["loading the base GGUF with the adapter in llama.cpp and probing it ..."]
    assert check["llama_cpp"] == {
        "passed": False,
        "error": "llama.cpp could not load broken.gguf: Failed to load model from file",
    }
    assert not check["passed"] and check["verifiers"] == ["transformers", "llama.cpp"]
    assert verify.failure(check).endswith(
        "; in llama.cpp: llama.cpp could not load broken.gguf: Failed to load model from file"
    )
