"""The verification kit of `merge`, `export gguf` and `export gguf-adapter`: every written model is probed.

The probes (chat prompts, tokenizer texts), greedy token agreement, the figures and tolerances each check
reports and passes by, loading a GGUF file back with transformers (and, when llama-cpp-python is installed,
in llama.cpp through `llamacpp.py`), and the failure path: a check that does not pass raises one line saying
what failed, that nothing was written, and where the report is. The greedy probe itself is
`infer.generate.greedy_probe`, shared with inference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llama_lora.errors import LlamaLoraError
from llama_lora.export import llamacpp
from llama_lora.infer import generate
from llama_lora.infer.loading import Loaded

PROBES = [
    "Who are you?",
    "Give me three tips for writing a clear email.",
    "What is the boiling point of water at sea level?",
    "Translate 'good morning' into French.",
]
TOKENIZER_PROBES = ["Hello world!", "  leading spaces, 12345 digits\nand a newline", "Grüße, café ☕ 日本"]

# merge: max |logit difference| allowed between merged and unmerged models, by the merged weights' dtype.
TOLERANCE = {"float32": 1e-3, "bfloat16": 1.0, "float16": 0.25}
MIN_AGREEMENT = {"float32": 1.0, "bfloat16": 0.9, "float16": 0.95}
# GGUF f16 must match the source closely: max |logit diff| over the probes, relative to the largest |logit|.
# 1e-2 leaves about ten times the headroom over what SmolLM2-135M and the tiny test model measure
# (bench/RESULTS.md), while a wrong q/k permutation or tokenizer shifts logits by whole units.
F16_REL_TOLERANCE = 1e-2
# GGUF q8_0 is lossy; its greedy agreement is reported, and only a file that is clearly broken fails.
Q8_MIN_AGREEMENT = 0.5


class ExportCheckError(LlamaLoraError):
    exit_code = 1


# ------------------------------------------------------------------------------------------- probes


def render_probes(loaded: Loaded, prompts: list[str]) -> list[list[int]]:
    """`prompts` as user turns, rendered as `loaded` renders prompts for generation."""
    return [generate.render_prompt(loaded, [{"role": "user", "content": p}]) for p in prompts]


def run_probes(
    loaded: Loaded, prompts: list[str], new_tokens: int
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """`generate.greedy_probe` on `prompts` rendered as user turns, stopping where generation would."""
    return generate.greedy_probe(loaded.model, render_probes(loaded, prompts), new_tokens, loaded.stop_ids)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """`prompt` as a user turn through a (HF) tokenizer's own chat template."""
    messages = [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def tokenizer_mismatches(ref_tok, tok) -> list[str]:
    """The tokenizer probe texts `tok` encodes differently from `ref_tok`."""
    return [t for t in TOKENIZER_PROBES if ref_tok.encode(t) != tok.encode(t)]


# ------------------------------------------------------------------------------------------ figures


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of greedy tokens that agree position by position (up to the first divergence counts)."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        total += n
        for i in range(min(len(x), len(y))):
            if x[i] != y[i]:
                break
            same += 1
    return same / total if total else 1.0


def max_abs_diff(ref_logits: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    """The largest |logit difference| over all probes and positions."""
    return max(float((a - b).abs().max()) for a, b in zip(ref_logits, logits))


def merge_figures(ref_logits, ref_tokens, logits, tokens, dtype: str) -> dict[str, Any]:
    """The merged model's probe against the unmerged one's, and whether it passes for the merged `dtype`."""
    diff, agree = max_abs_diff(ref_logits, logits), agreement(ref_tokens, tokens)
    return {
        "max_abs_logit_diff": diff,
        "greedy_token_agreement": agree,
        "tolerance": TOLERANCE[dtype],
        "min_agreement": MIN_AGREEMENT[dtype],
        "passed": diff <= TOLERANCE[dtype] and agree >= MIN_AGREEMENT[dtype],
    }


def figures(ref_logits, ref_tokens, logits, tokens, mismatched: list[str], kind: str) -> dict[str, Any]:
    """The agreement figures of a GGUF file's probe against its source's, and whether they pass for `kind`."""
    diff = max_abs_diff(ref_logits, logits)
    scale = max(float(a.abs().max()) for a in ref_logits)
    agree = agreement(ref_tokens, tokens)
    passed = not mismatched and (
        diff <= F16_REL_TOLERANCE * scale if kind in ("f16", "f32") else agree >= Q8_MIN_AGREEMENT
    )
    return {
        "tokenizer_round_trip": not mismatched,
        "tokenizer_mismatches": mismatched,
        "probes": len(ref_tokens),
        "probe_new_tokens": max(len(t) for t in ref_tokens),
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative_logit_diff": diff / scale if scale else 0.0,
        "greedy_token_agreement": agree,
        "tolerance": f"relative logit diff <= {F16_REL_TOLERANCE}"
        if kind in ("f16", "f32")
        else f"greedy agreement >= {Q8_MIN_AGREEMENT}",
        "passed": passed,
    }


# ------------------------------------------------------------------------------------- failure path


def merge_failure(report: dict[str, Any]) -> str:
    """What failed in a merge check, in one line."""
    return (
        f"max |logit diff| {report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']}), greedy "
        f"agreement {report['greedy_token_agreement']:.2%} (need {report['min_agreement']:.0%})"
    )


def failure(report: dict[str, Any]) -> str:
    """What failed in a GGUF check, in one line."""
    text = (
        f"tokenizer round trip {report['tokenizer_round_trip']} {report['tokenizer_mismatches'] or ''}, "
        f"max |logit diff| {report['max_abs_logit_diff']:.3g} (relative {report['relative_logit_diff']:.2g}), "
        f"greedy agreement {report['greedy_token_agreement']:.0%} ({report['tolerance']})"
    )
    lc = report.get("llama_cpp")
    if lc is not None and not lc["passed"]:
        text += f"; in llama.cpp: {lc.get('error') or failure(lc)}"
    return text


def require_passed(
    report: dict[str, Any],
    error: type[LlamaLoraError],
    what: str,
    target: Path,
    report_path: Path | None,
    describe: Callable[[dict[str, Any]], str] = failure,
) -> None:
    """Raise `error` unless `report` passed: "<what> check failed: <describe(report)>; nothing written to
    <target> (report in <report_path>)", the last part only when a report was kept."""
    if report["passed"]:
        return
    where = f" (report in {report_path})" if report_path is not None else ""
    raise error(f"{what} check failed: {describe(report)}; nothing written to {target}{where}")


# ----------------------------------------------------------------------------- loading a GGUF back


def load_gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file, as transformers reads it back."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_model(path: Path, rope: dict[str, Any]):
    """A GGUF file loaded by transformers' GGUF loader (dequantized to float32, q/k rows un-permuted)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if rope.get("rope_type") == "llama3":  # transformers' GGUF loader does not read rope_freqs
        extra["config"] = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        extra["config"].rope_parameters = rope
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()


def llamacpp_figures(
    model_path: Path,
    prompts: list[list[int]],
    reference: tuple[list[torch.Tensor], list[list[int]]],
    tokenizer,
    kind: str,
    new_tokens: int,
    lora_path: Path | None = None,
) -> dict[str, Any]:
    """The file(s) probed in llama.cpp: figures as `figures` gives them against `reference` (the source's
    logits and greedy tokens), or `{"passed": False, "error": ...}` if llama.cpp cannot load them. `prompts`
    are token ids; `tokenizer` is the source's (HF) tokenizer."""
    # the probe texts as plain text, and the rendered prompts (their special tokens parsed as such)
    texts = TOKENIZER_PROBES + [tokenizer.decode(ids) for ids in prompts]
    wanted = [tokenizer.encode(t, add_special_tokens=False) for t in TOKENIZER_PROBES] + prompts
    try:
        got, logits, tokens = llamacpp.probe(model_path, prompts, texts, new_tokens, lora_path)
    except llamacpp.LoadError as exc:
        return {"passed": False, "error": str(exc)}
    mismatched = [t for t, ids, own in zip(texts, wanted, got) if own != ids]
    return figures(*reference, logits, tokens, mismatched, kind)


def add_llamacpp(
    check: dict[str, Any],
    model_path: Path,
    prompts: list[list[int]],
    reference: tuple[list[torch.Tensor], list[list[int]]],
    tokenizer,
    kind: str,
    new_tokens: int,
    log=print,
    lora_path: Path | None = None,
) -> dict[str, Any]:
    """`check` (the transformers figures) with llama.cpp's figures added as `llama_cpp`, when llama-cpp-python
    is importable; both must pass."""
    if not llamacpp.available():
        return check
    if lora_path is None:
        log("loading the GGUF file in llama.cpp and probing it ...")
    else:
        log("loading the base GGUF with the adapter in llama.cpp and probing it ...")
    check["llama_cpp"] = llamacpp_figures(
        model_path, prompts, reference, tokenizer, kind, new_tokens, lora_path
    )
    check["verifiers"].append("llama.cpp")
    check["passed"] = check["passed"] and check["llama_cpp"]["passed"]
    return check
