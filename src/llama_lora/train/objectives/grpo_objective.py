"""GRPO as an `Objective` (base.py): at the start of each optimizer step (`begin_step`) the step's prompts are
sampled `num_generations` times with the adapter as it is (rollouts.py), scored by the rewards (rewards.py)
and given group-relative advantages; the loop then runs the clipped surrogate (grpo.GRPOLoss) over the
prompt + completion rows of each micro-batch, as it runs any objective's loss.

A micro-batch holds whole groups (`train.batch_size // num_generations` prompts with all their completions),
so data-parallel processes split a step's prompts with every group kept on one process. The step's units
(what its summed loss is divided by) are summed over the processes after sampling: completion tokens
(`dapo`), completions (`grpo`, `dr_grpo`) or micro-batches (`bnpo`). With `num_iterations` N > 1 a step's
completions serve N optimizer steps (the plan repeats the step's prompts), with importance ratios against
the log-probabilities they were sampled with.

Evaluation is generation: the held-out prompts answered greedily and scored by the same rewards
(`eval_reward`, `eval_accuracy/<reward>`); there is no held-out loss. A few completions of each logging step
go to samples.jsonl with their rewards.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_lora.data.encoding import IGNORE, Example
from llama_lora.infer.sampling import Sampling
from llama_lora.train import rewards as rewards_mod
from llama_lora.train.objectives.grpo import GRPOLoss, group_advantages
from llama_lora.train.rollouts import Completion, Rollouts, seed_for

SAMPLES_PER_LOG = 4  # completions written to samples.jsonl per logging step


@dataclass
class Group:
    """One prompt's completions in the current step and what training needs of them."""

    completions: list[Completion]
    advantages: torch.Tensor  # (num_generations,)
    old_logps: list[torch.Tensor] | None = None  # per completion token, when num_iterations > 1
    ref_logps: list[torch.Tensor] | None = None  # per completion token, when beta > 0


@dataclass
class Context:
    """Where the objective runs: the process, the device and autocast of the training forward, the run."""

    device: torch.device
    autocast: tuple[str, torch.dtype, bool]  # device type, dtype, enabled
    run: Path
    main: bool = True
    rank: int = 0
    world: int = 1


class GRPOObjective:
    def __init__(
        self, peft_model, loaded, specs, rollouts: Rollouts, collate_rows, where: Context, fresh: bool
    ):
        """`specs`: the rewards (rewards.load_rewards); `collate_rows(examples)`: the fast path's collate;
        `fresh`: the adapter starts at B = 0, so the KL reference (beta > 0) is the base with it switched
        off; otherwise the reference is the adapter as training starts, kept here."""
        t = loaded.cfg.train
        self.t, self.specs, self.rollouts, self.rows, self.at = t, specs, rollouts, collate_rows, where
        self.peft_model = peft_model
        self.module = GRPOLoss(
            peft_model,
            t.loss_type,
            t.epsilon,
            t.epsilon_high or t.epsilon,
            t.beta,
            t.temperature,
            t.max_completion_length,
        )
        self.sampling = Sampling(
            max_new_tokens=t.max_completion_length,
            greedy=False,
            temperature=t.temperature,
            top_p=t.top_p,
            top_k=t.top_k,
        )
        self.eval_prompts = loaded.ds.eval
        self.groups: dict[int, Group] = {}  # id(prompt example) -> its group, for the current step
        self.window: dict[str, float] = {}  # sums since the last logging step
        self.shown: list[dict] = []  # the latest step's completions for samples.jsonl
        self.step, self.first_step, self.last_reward = 0, None, math.nan
        self.trained_since: float | None = None
        self.reference = None
        if t.beta > 0 and not fresh:
            self.reference = {
                n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad
            }

    # -- the step ------------------------------------------------------------------------------------------
    @staticmethod
    def units(example) -> int:
        return 1

    def begin_step(self, step, micro_batches, mine, reduce) -> tuple[float, int]:
        self._close_training()
        if self.first_step is None:
            self.first_step = step
            self._trim_samples(step)
        self.step = step
        examples = [e for b, _ in mine for e in b]
        reuse = (step - 1) % self.t.num_iterations != 0 and all(id(e) in self.groups for e in examples)
        if not reuse:
            self._sample(step, micro_batches, mine, reduce)
        mask_cut = self.t.mask_truncated_completions
        units = tokens = 0.0
        for b, weight in mine:
            if weight == 0:
                continue
            done = [c for e in b for c in self.groups[id(e)].completions]
            counted = sum(len(c.tokens) for c in done if not (mask_cut and c.truncated))
            units += {"dapo": counted, "bnpo": 1}.get(self.t.loss_type, len(done))
            tokens += sum(len(e) * self.t.num_generations for e in b) + sum(len(c.tokens) for c in done)
        units, tokens = reduce(units, tokens)
        self.trained_since = time.perf_counter()
        return max(units, 1.0), int(tokens)

    def _sample(self, step: int, micro_batches, mine, reduce) -> None:
        g, t = self.t.num_generations, self.t
        order = {id(e): i for i, e in enumerate(e for b in micro_batches for e in b)}
        # once each: a data-parallel process's weightless re-run may repeat a micro-batch it also runs
        examples = list({id(e): e for b, _ in mine for e in b}.values())
        started = time.perf_counter()
        seeds = [seed_for(t.seed, step, order[id(e)] * g + k) for e in examples for k in range(g)]
        done = self.rollouts.sample([e.input_ids for e in examples for _ in range(g)], self.sampling, seeds)
        scores = self._score(examples, done)
        unscorable = set(scores.unscorable)
        totals = torch.tensor([math.nan if i in unscorable else v for i, v in enumerate(scores.total)])
        std = None
        if t.scale_rewards == "batch":  # the whole step's spread, over every process's completions
            present = totals[~totals.isnan()]
            n, s, s2 = reduce(float(present.numel()), float(present.sum()), float((present**2).sum()))
            std = math.sqrt(max(s2 - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0
        advantages = group_advantages(totals, g, t.scale_rewards, batch_std=std)
        self.groups = {
            id(e): Group(done[i * g : (i + 1) * g], advantages[i * g : (i + 1) * g])
            for i, e in enumerate(examples)
        }
        weighted = {id(e) for b, w in mine if w > 0 for e in b}
        kept = [i * g + k for i, e in enumerate(examples) if id(e) in weighted for k in range(g)]
        self._record(examples, done, scores, totals, kept)
        if t.num_iterations > 1 or t.beta > 0:
            self._keep_logps([b for b, _ in mine])
        self._add("sampling_seconds", time.perf_counter() - started)

    def _score(self, examples, done: list[Completion]) -> rewards_mod.Scores:
        return score_completions(
            self.specs, [e for e in examples for _ in range(self.t.num_generations)], done
        )

    @torch.no_grad()
    def _keep_logps(self, batches) -> None:
        """The log-probabilities the completions were sampled with (num_iterations > 1) and the reference's
        (beta > 0), per completion token, before any update of this step."""
        device_type, dtype, enabled = self.at.autocast
        was_training = self.module.training
        self.module.eval()
        for b in batches:
            batch = {k: v.to(self.at.device) for k, v in self.collate(b, with_logps=False).items()}
            batch.pop("advantages")
            width = batch["completion_mask"].shape[1]
            mask = batch.pop("completion_mask")
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                old = self.module.token_logps(**batch, width=width) if self.t.num_iterations > 1 else None
                ref = None
                if self.t.beta > 0:
                    with self._as_reference():
                        ref = self.module.token_logps(**batch, width=width)
            lengths = mask.new_tensor(
                [len(c.tokens) for e in b for c in self.groups[id(e)].completions]
            ).long()
            for i, e in enumerate(b):
                group, g = self.groups[id(e)], self.t.num_generations
                rows = range(i * g, (i + 1) * g)
                if old is not None:
                    group.old_logps = [old[r, : lengths[r]].cpu() for r in rows]
                if ref is not None:
                    group.ref_logps = [ref[r, : lengths[r]].cpu() for r in rows]
        self.module.train(was_training)

    @contextlib.contextmanager
    def _as_reference(self):
        if self.reference is None:
            with self.peft_model.disable_adapter():
                yield
            return
        params = {n: p for n, p in self.peft_model.named_parameters() if n in self.reference}
        current = {n: p.detach().clone() for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data.copy_(self.reference[n])
            yield
        finally:
            for n, p in params.items():
                p.data.copy_(current[n])

    def collate(self, examples, with_logps: bool = True) -> dict[str, torch.Tensor]:
        rows, advantages, done, old, ref = [], [], [], [], []
        for e in examples:
            group = self.groups[id(e)]
            for k, c in enumerate(group.completions):
                rows.append(Example(e.input_ids + c.tokens, [IGNORE] * len(e.input_ids) + c.tokens))
                done.append(c)
                if with_logps and group.old_logps is not None:
                    old.append(group.old_logps[k])
                if with_logps and group.ref_logps is not None:
                    ref.append(group.ref_logps[k])
            advantages.append(group.advantages)
        width = max(len(c.tokens) for c in done)
        mask = torch.zeros(len(done), width)
        for j, c in enumerate(done):
            if not (self.t.mask_truncated_completions and c.truncated):
                mask[j, : len(c.tokens)] = 1.0
        batch = dict(self.rows(rows))
        batch["advantages"], batch["completion_mask"] = torch.cat(advantages), mask
        for key, values in (("old_logps", old), ("ref_logps", ref)):
            if values:
                grid = torch.zeros(len(done), width)
                for j, v in enumerate(values):
                    grid[j, : v.numel()] = v
                batch[key] = grid
        return batch

    # -- what it logs --------------------------------------------------------------------------------------
    def _add(self, key: str, value: float) -> None:
        self.window[key] = self.window.get(key, 0.0) + value

    def _record(self, examples, done, scores, totals, kept: list[int]) -> None:
        """Sums of the step's rewards and lengths (of this process's weighted completions) for the window."""
        g = self.t.num_generations
        step = rewards_mod.reward_sums(self.specs, scores, totals.tolist(), kept)
        for key, value in step.items():
            self._add(key, value)
        self._add("completions/n", len(kept))
        self._add("completions/tokens", sum(len(done[i].tokens) for i in kept))
        self._add("completions/truncated", sum(done[i].truncated for i in kept))
        self.window["completions/max"] = max(
            self.window.get("completions/max", 0.0), *(len(done[i].tokens) for i in kept)
        )
        groups = sorted({i // g for i in kept})
        flat = sum(1 for j in groups if float(totals[j * g : (j + 1) * g].nan_to_num(0.0).std()) == 0.0)
        self._add("groups/n", len(groups))
        self._add("groups/flat", flat)
        self.last_reward = step["reward/sum"] / step["reward/n"] if step["reward/n"] else math.nan
        self.shown = [
            {
                "prompt": examples[i // g].prompt,
                "completion": done[i].text,
                "rewards": {s.name: scores.per_reward[s.name][i] for s in self.specs},
                "reward": None if math.isnan(totals[i]) else float(totals[i]),
                "advantage": round(float(self.groups[id(examples[i // g])].advantages[i % g]), 4),
            }
            for i in kept[::g][:SAMPLES_PER_LOG]
        ]

    def _close_training(self) -> None:
        if self.trained_since is not None:
            self._add("training_seconds", time.perf_counter() - self.trained_since)
            self.trained_since = None

    def take_metrics(self, mode: str = "train", reduce=None) -> dict[str, float]:
        self._close_training()
        if mode == "eval":
            return self._evaluate(reduce)
        reduce = reduce or (lambda *v: list(v))
        w, self.window = self.window, {}
        keys = sorted(k for k in w if k != "completions/max")
        sums = dict(zip(keys, reduce(*(w[k] for k in keys))))
        longest = reduce(
            *[w.get("completions/max", 0.0) if r == self.at.rank else 0.0 for r in range(self.at.world)]
        )
        metrics: dict[str, float] = {}
        if sums.get("completions/n"):  # steps that reuse earlier completions sample nothing new
            metrics = self._sampled(sums, max(longest))
        module, self.module.sums = self.module.sums, {}
        mkeys = sorted(module)
        msums = dict(zip(mkeys, reduce(*(module[k] for k in mkeys)))) if mkeys else {}
        tokens = max(msums.pop("tokens", 0.0), 1.0)
        metrics |= {k: v / tokens for k, v in msums.items()}
        # seconds of the main process (each process samples its own share at the same time)
        metrics["sampling_seconds"] = w.get("sampling_seconds", 0.0)
        metrics["training_seconds"] = w.get("training_seconds", 0.0)
        self._write_samples()
        return metrics

    def _sampled(self, sums: dict[str, float], longest: float) -> dict[str, float]:
        """The window's reward and completion metrics from its summed statistics."""
        metrics = rewards_mod.reward_metrics(sums, self.specs)
        n = max(sums.get("completions/n", 0.0), 1.0)
        metrics["completions/mean_length"] = sums.get("completions/tokens", 0.0) / n
        metrics["completions/max_length"] = longest
        metrics["completions/clipped_ratio"] = sums.get("completions/truncated", 0.0) / n
        metrics["frac_reward_zero_std"] = sums.get("groups/flat", 0.0) / max(sums.get("groups/n", 0.0), 1.0)
        return metrics

    def _evaluate(self, reduce) -> dict[str, float]:
        """The held-out prompts (this process's share), answered greedily, scored by the rewards."""
        mine = self.eval_prompts[self.at.rank :: self.at.world]
        reduce = reduce or (lambda *v: list(v))
        if not self.eval_prompts:
            return {}
        greedy = Sampling(max_new_tokens=self.t.max_completion_length, greedy=True)
        done = self.rollouts.sample([e.input_ids for e in mine], greedy, None) if mine else []
        if mine:
            scores = score_completions(self.specs, mine, done)
        else:  # more processes than held-out prompts: this one adds nothing, but joins the sum
            scores = rewards_mod.Scores({spec.name: [] for spec in self.specs}, [])
        mine_sums = rewards_mod.reward_sums(self.specs, scores, scores.total, range(len(done)))
        mine_sums["tokens"] = sum(len(c.tokens) for c in done)
        keys = sorted(mine_sums)
        sums = dict(zip(keys, reduce(*(mine_sums[k] for k in keys))))
        out = rewards_mod.reward_metrics(sums, self.specs, prefix="eval_")
        out["eval_completions/mean_length"] = sums["tokens"] / max(sums["reward/n"], 1.0)
        return out

    def recording(self, on: bool) -> None:
        self.module.recording = on

    def progress(self) -> str:
        return "" if math.isnan(self.last_reward) else f"reward {self.last_reward:.3f}"

    def eval_batches(self, examples, batch_size: int, max_batch_tokens: int | None) -> list:
        return []  # evaluation generates (take_metrics("eval")); there is no held-out loss

    # -- samples.jsonl -------------------------------------------------------------------------------------
    def _write_samples(self) -> None:
        if not self.at.main or not self.shown:
            return
        with self.at.run.joinpath("samples.jsonl").open("a", encoding="utf-8") as f:
            for record in self.shown:
                f.write(json.dumps({"step": self.step, **record}, ensure_ascii=False) + "\n")
        self.shown = []

    def _trim_samples(self, step: int) -> None:
        """A resumed run drops what the abandoned future wrote (records of this step on)."""
        path = self.at.run / "samples.jsonl"
        if not self.at.main or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(x for x in lines if json.loads(x).get("step", 0) < step), encoding="utf-8")


def score_completions(specs, prompts, done: list[Completion]) -> rewards_mod.Scores:
    """The rewards of `done[i]`, a completion of the prompt example `prompts[i]` (TRL's arguments: the prompt
    as the row gave it, the completion as text or, for a conversational prompt, an assistant message, and
    the row's other columns)."""
    names = sorted({k for e in prompts for k in e.columns})
    completions = [
        [{"role": "assistant", "content": c.text}] if isinstance(e.prompt, list) else c.text
        for e, c in zip(prompts, done)
    ]
    columns = {k: [e.columns.get(k) for e in prompts] for k in names}
    return rewards_mod.score(
        specs, [e.prompt for e in prompts], completions, columns, rows=[e.row for e in prompts]
    )
