"""Base model vs adapter on the same held-out prompts (the seed's baseline_inference.py, done properly).

Both sides use one loaded model: the adapter switched off is exactly the base model (PiSSA/OLoRA adapters
are saved converted, so this holds for them too). Metrics per side: eval loss and perplexity on the
response tokens, ROUGE-L against the references, generation length, how often generation stopped on its
own, and the dataset's behaviour probe when it declares one.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llama_lora import run_dir
from llama_lora.config import Config, DataConfig
from llama_lora.data import encoding, sources
from llama_lora.data.batching import eval_batches, pad_id_for
from llama_lora.errors import LlamaLoraError
from llama_lora.evaluate import lmeval, lmeval_tasks, report
from llama_lora.infer import frontends, generate, loading
from llama_lora.train.objectives.sft import ResponseLoss, eval_sums
from llama_lora.train.settings import batch_tokens


class CompareError(LlamaLoraError):
    pass


def held_out_rows(src: loading.AdapterSource, data_file: str | None) -> tuple[list[dict], str, dict | None]:
    """The run's eval split (or `data_file`), a label for it, and the dataset's behaviour probe."""
    if data_file:
        return sources.load_rows(data_file, "train"), data_file, sources.load_probe(data_file)
    if src.cfg is None:
        raise CompareError("compare: this adapter has no run config to find its eval split; pass --data FILE")

    _, held = sources.split_rows(src.cfg.data, src.cfg.train.seed)
    if not held:
        raise CompareError(
            "compare: the run held out no eval rows (data.eval_fraction 0, no eval_split); pass --data FILE"
        )
    return (
        held,
        f"{src.cfg.data.source} ({src.cfg.data.eval_split or 'eval_fraction'})",
        sources.load_probe(src.cfg.data.source),
    )


def eval_loss(loaded: loading.Loaded, examples: list[encoding.Example], cfg: Config | None = None) -> float:
    """Mean response-token loss over `examples`, batched as training batches its evaluation: the run's
    `train.batch_size` and token budget (the defaults without a run config; an `auto` budget for the device
    compare runs on). The adapter side then equals the run's `eval_loss`, the base side its `eval_loss_before`
    (within the rounding of the precision: bf16 autocast where `loaded.precision` is bf16, as training's
    evaluation runs under it, float32 otherwise)."""
    cfg = cfg or Config()
    budget = batch_tokens(cfg, loaded.device)
    batches = eval_batches(examples, cfg.train.batch_size, budget, pad_id_for(loaded.tokenizer))
    device_type = torch.device(loaded.device).type
    # created in eval mode, so that eval_sums leaves the model in eval mode for generation (no dropout)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=loaded.precision == "bf16"):
        total, count = eval_sums(ResponseLoss(loaded.model).eval(), batches, loaded.device)
    return total / max(count, 1)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return statistics.fmean(scores) if scores else 0.0


def side_metrics(loaded, examples, prompts, references, probe, settings, cfg=None) -> dict[str, Any]:
    """One side's metrics; `examples` None (GRPO's prompts): no loss, the rewards score the replies."""
    generations = generate.generate_many(loaded, prompts, settings)
    texts = [g.text for g in generations]
    out: dict[str, Any] = {}
    if examples is not None:
        loss = eval_loss(loaded, examples, cfg)
        out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    out |= {
        "rouge_l": rouge_l(texts, references),
        "mean_generated_tokens": statistics.fmean(len(g.token_ids) for g in generations),
        "stop_rate": sum(g.stopped for g in generations) / len(generations),
        "generations": texts,
    }
    if probe:
        pattern = re.compile(probe["pattern"])
        out["probe_rate"] = sum(bool(pattern.search(t)) for t in texts) / len(texts)
    return out


def held_out_pairs(rows, loaded, dcfg, label):
    """Preference pairs -> prompts, chosen answers (the references), chosen examples (their loss) and the
    side's preference metrics."""
    from llama_lora.data import pairs

    pair_examples, _ = pairs.prepare_pairs(rows, loaded.tokenizer, dcfg, loaded.template, where=label)
    prompts, references = [], []
    for row in rows:
        try:
            prompt, chosen, _ = pairs.pair_messages(row, dcfg.system_prompt)
        except ValueError:
            continue  # prepare_pairs skipped it too (data.skip_bad_rows)
        prompts.append(prompt)
        references.append(chosen["content"])
    chosen_examples = [p.chosen for p in pair_examples]
    return (
        prompts,
        references,
        chosen_examples,
        lambda cfg, texts: preference_metrics(loaded, pair_examples, cfg),
    )


def held_out_kto(rows, loaded, dcfg, label):
    """KTO rows -> the desirable answers' prompts, those answers (the references) and examples (their loss),
    and the side's KTO metrics over all of them."""
    from llama_lora.data import kto

    examples, _ = kto.prepare_kto(rows, loaded.tokenizer, dcfg, loaded.template, where=label)
    prompts, references = [], []
    for row in rows:
        try:
            answers = kto.kto_messages(row, dcfg.system_prompt)
        except ValueError:
            continue  # prepare_kto skipped it too (data.skip_bad_rows)
        for prompt, answer, desirable in answers:
            if desirable:
                prompts.append(prompt)
                references.append(answer["content"])
    if not prompts:
        raise CompareError(f"compare: {label} holds no desirable answers to compare generations with")
    good = [e.example for e in examples if e.desirable]
    return prompts, references, good, lambda cfg, texts: kto_metrics(loaded, examples, cfg)


@torch.no_grad()
def sequence_logps(loaded, examples: list[encoding.Example], cfg: Config) -> list[float]:
    """Each example's summed response log-probability, in `examples`' order, batched as evaluation is and,
    like `eval_loss`, under bf16 autocast where `loaded.precision` is bf16 (as training evaluates)."""
    from llama_lora.data.batching import collate, plan_batches
    from llama_lora.train.objectives.preference import model_logps

    loaded.model.eval()
    budget = batch_tokens(cfg, loaded.device)
    plan = plan_batches([len(e) for e in examples], cfg.train.batch_size, budget, seed=0, shuffle=False)
    out = [0.0] * len(examples)
    device_type = torch.device(loaded.device).type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=loaded.precision == "bf16"):
        for b in plan:
            batch = collate([examples[i] for i in b], pad_id_for(loaded.tokenizer))
            sums, _ = model_logps(loaded.model, **{k: v.to(loaded.device) for k, v in batch.items()})
            for i, value in zip(b, sums.tolist()):
                out[i] = value
    return out


def preference_metrics(loaded, pair_examples, cfg: Config | None) -> dict[str, float]:
    """Held-out preference accuracy: how often the model gives the chosen answer a higher summed log-
    probability than the rejected one (no reference model), and the mean margin between them."""
    cfg = cfg or Config()
    n = len(pair_examples)
    sums = sequence_logps(
        loaded, [p.chosen for p in pair_examples] + [p.rejected for p in pair_examples], cfg
    )
    margins = [c - r for c, r in zip(sums[:n], sums[n:])]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / max(n, 1),
        "preference_margin": statistics.fmean(margins) if margins else 0.0,
    }


def kto_metrics(loaded, kto_examples, cfg: Config | None) -> dict[str, float]:
    """The mean summed log-probability of the held-out desirable answers and of the undesirable ones, and the
    margin between them. The adapter's margin minus the base's, times beta, is KTO's held-out reward margin
    (TRL's `rewards/margins`, the base being the reference)."""
    cfg = cfg or Config()
    sums = sequence_logps(loaded, [e.example for e in kto_examples], cfg)
    good = [s for s, e in zip(sums, kto_examples) if e.desirable]
    bad = [s for s, e in zip(sums, kto_examples) if not e.desirable]
    out = {}
    if good:
        out["desirable_logp"] = statistics.fmean(good)
    if bad:
        out["undesirable_logp"] = statistics.fmean(bad)
    if good and bad:
        out["kto_margin"] = out["desirable_logp"] - out["undesirable_logp"]
    return out


def held_out_grpo(rows, loaded, dcfg, label):
    """GRPO's prompts -> prompts, each row's `answer` (or "") as the reference for ROUGE-L, no loss examples,
    and the side's rewards over its replies (`extra(cfg, texts)`: held-out reward and accuracy)."""
    from llama_lora.data import prompts as prompt_rows
    from llama_lora.train import rewards
    from llama_lora.train.objectives.grpo_objective import score_completions
    from llama_lora.train.rollouts import Completion

    examples, _ = prompt_rows.prepare_prompts(rows, loaded.tokenizer, dcfg, loaded.template, where=label)
    if not examples:
        raise CompareError(f"compare: {label} has no usable prompts")
    prompts = [[m for m in e.messages if m["role"] != "system"] for e in examples]
    references = [str(e.columns.get("answer") or "") for e in examples]

    def extra(cfg, texts: list[str]) -> dict[str, float]:
        specs = rewards.load_rewards(cfg.train.rewards, cfg.train.reward_weights)
        scores = score_completions(specs, examples, [Completion([], t, False) for t in texts])
        named = rewards.summary(scores, specs)  # each reward's mean; an accuracy where all are 0 or 1
        out = {"reward": statistics.fmean(scores.total)}
        for spec in specs:
            out[f"reward/{spec.name}"] = named[f"rewards/{spec.name}/mean"]
            if f"accuracy/{spec.name}" in named:
                out[f"accuracy/{spec.name}"] = named[f"accuracy/{spec.name}"]
        return out

    return prompts, references, None, extra


def held_out_prompts(rows, loaded, dcfg, label, objective: str):
    """The prompts, their references, the examples whose loss is measured, and the side's extra metrics
    (`extra(cfg, texts)`: a preference, KTO or GRPO run's, given the side's replies; None for SFT)."""
    if objective == "grpo":
        return held_out_grpo(rows, loaded, dcfg, label)
    if objective == "kto":
        return held_out_kto(rows, loaded, dcfg, label)
    if objective != "sft":  # dpo, orpo: the held-out rows are pairs, the chosen answer the reference
        return held_out_pairs(rows, loaded, dcfg, label)
    prompts, references = [], []
    for row in rows:
        messages, reference = frontends.row_prompt(row)
        if reference is None:
            raise CompareError(f"compare: {label} has rows without a reference response")
        prompts.append(messages)
        references.append(reference)
    examples, _ = encoding.prepare(rows, loaded.tokenizer, dcfg, loaded.template, where=label)
    return prompts, references, examples, None


def both_sides(loaded, examples, prompts, references, probe, settings, extra, log):
    """The adapter side, then the base side (the adapter unmerged and switched off): each side's metrics."""
    cfg = loaded.source.cfg

    def one_side() -> dict[str, Any]:
        out = side_metrics(loaded, examples, prompts, references, probe, settings, cfg)
        return {**out, **extra(cfg, out["generations"])} if extra is not None else out

    adapter_side = one_side()
    log("... and the base model (adapter switched off)")
    loaded.model.unmerge_adapter()  # restore the base weights, then bypass the adapter
    loaded.decoder = None  # its bf16 copies hold the merged weights
    with loaded.model.disable_adapter():
        base_side = one_side()
    return base_side, adapter_side


def _reward_margin(base_side, adapter_side, cfg: Config | None) -> float | None:
    """KTO's held-out reward margin, beta x (the adapter's desirable-minus-undesirable log-prob margin minus
    the base's): TRL's eval `rewards/margins` with the base as the reference. None for other runs."""
    if cfg is None or "kto_margin" not in base_side or "kto_margin" not in adapter_side:
        return None
    return cfg.train.beta * (adapter_side["kto_margin"] - base_side["kto_margin"])


def write_reports(target: Path, result: dict[str, Any], src: loading.AdapterSource) -> list[str]:
    """compare.json, report.md and report.html in `target`; their paths."""
    target.mkdir(parents=True, exist_ok=True)
    run_dir.write_text_atomic(target / "compare.json", json.dumps(result, indent=2) + "\n")
    metrics = run_dir.read_metrics(src.run_dir / "metrics.jsonl") if src.run_dir else []
    run_dir.write_text_atomic(target / "report.md", report.markdown(result))
    run_dir.write_text_atomic(target / "report.html", report.html(result, metrics))
    return [str(target / f) for f in ("compare.json", "report.md", "report.html")]


def compare(
    adapter: str,
    data_file: str | None = None,
    n: int = 32,
    max_new_tokens: int = 96,
    base: str | None = None,
    device: str = "auto",
    out_dir: str | None = None,
    benchmarks: str | None = None,
    bench_limit: int | None = None,
    bench_data: str | None = None,
    precision: str = "fp32",
    verbose: bool = False,
    log=print,
) -> dict[str, Any]:
    start = time.perf_counter()
    bench_names = None
    if benchmarks:  # unknown tasks and absent files fail before anything is loaded
        bench_names = lmeval_tasks.parse_tasks(benchmarks)
        lmeval_tasks.check_data(bench_names, bench_data)
    loaded = loading.load(base=base, adapter=adapter, device=device, log=log, precision=precision)
    src = loaded.source
    assert src is not None
    rows, label, probe = held_out_rows(src, data_file)
    rows = rows[:n]
    dcfg = (src.cfg.data if src.cfg else None) or DataConfig()
    objective = src.cfg.train.objective if src.cfg is not None else "sft"
    prompts, references, examples, extra = held_out_prompts(rows, loaded, dcfg, label, objective)
    settings = generate.GenerationSettings(max_new_tokens=max_new_tokens, greedy=True)
    log(f"comparing on {len(rows)} held-out prompts from {label}: adapter ...")
    base_side, adapter_side = both_sides(loaded, examples, prompts, references, probe, settings, extra, log)
    bench = None
    if bench_names:
        log(f"general skills: {', '.join(bench_names)} through lm-evaluation-harness, base then adapter")
        bench = lmeval.run_loaded(loaded, bench_names, bench_data, bench_limit, verbose=verbose)
    result = {
        "adapter": str(src.adapter_dir),
        "base_model": src.base_name,
        "data": label,
        "n": len(rows),
        "max_new_tokens": max_new_tokens,
        "generation_precision": loaded.precision,
        "probe": probe,
        "base": {k: v for k, v in base_side.items() if k != "generations"},
        "adapter_metrics": {k: v for k, v in adapter_side.items() if k != "generations"},
        "examples": [
            {"prompt": p[-1]["content"], "reference": r, "base": b, "adapter": a}
            for p, r, b, a in zip(prompts, references, base_side["generations"], adapter_side["generations"])
        ],
        "benchmarks": bench,
        "kto_reward_margin": _reward_margin(base_side, adapter_side, src.cfg),
        "runtime_s": round(time.perf_counter() - start, 2),
    }
    target = Path(out_dir) if out_dir else (src.run_dir or src.adapter_dir)
    result["files"] = write_reports(target, result, src)
    return result
