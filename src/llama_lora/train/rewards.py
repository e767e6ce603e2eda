"""Reward functions for GRPO (`train.rewards`): the built-ins, loading user ones, scoring a batch.

A reward function has TRL's signature, so a function written for TRL's GRPOTrainer works here unchanged:
`fn(prompts, completions, **columns) -> list[float | None]`. `columns` holds every dataset column of the
batch as a list aligned with `completions` (`answer=[...]`, `check=[...]`); the function must accept keyword
arguments it does not use (`**kwargs`). It returns one reward per completion; None means "not applicable to
this completion" (TRL turns it into NaN and skips it). A completion is a string, or TRL's conversational
form (a list of messages, the last one's `content` scored).

`load_rewards` turns names (`BUILTINS`, written in reward_builtins.py) and `path/to/file.py:function`
specs into `RewardSpec`s (a `ConfigError` of one line naming the spec otherwise); `score` runs them over a
batch and combines them as TRL 1.16 does: the total is the weighted sum with None skipped (`nansum`), so a
completion no reward applies to totals 0.0 (`Scores.unscorable` lists those; TRL leaves them out of its
baseline and its logged reward, and logs a warning, which is the caller's to do here).
A reward that raises or returns something unusable is a `RewardError` naming the reward and the row.
`summary` gives the metrics under the names TRL logs them; `reward_sums` and
`reward_metrics` give the same from sums that add up across steps and processes (GRPO's logging windows).
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_lora.errors import ConfigError, LlamaLoraError
from llama_lora.train.reward_builtins import (  # noqa: F401  (re-exported: the API is here)
    CHECK_CALLS,
    DEFAULT_FORMAT_PATTERN,
    LENGTH_TARGET,
    RowValueError,
    answer_format,
    exact_answer,
    final_answer,
    length_penalty,
    normalise,
    python_check,
)

RewardFn = Callable[..., list]
NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # TRL passes these separately, not as columns


class RewardError(LlamaLoraError):
    """A reward function failed or returned something that is not one reward per completion."""


BUILTINS: dict[str, RewardFn] = {
    "exact_answer": exact_answer,
    "answer_format": answer_format,
    "length_penalty": length_penalty,
    "python_check": python_check,
}

# -- loading ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a run: its name (the metric name: `rewards/<name>/mean`), function and weight."""

    name: str
    fn: RewardFn
    weight: float = 1.0


_MODULE_IDS = itertools.count()


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[RewardSpec]:
    """Built-in names and `path/to/file.py:function` specs -> RewardSpecs (weights default to 1.0).
    Every problem is a one-line ConfigError naming the spec."""
    known = ", ".join(BUILTINS)
    if not specs:
        raise ConfigError(
            f"train.rewards: empty; name at least one reward ({known}, or path/to/file.py:function)"
        )
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise ConfigError(
            f"train.reward_weights: {len(weights)} weights for {len(specs)} rewards ({', '.join(specs)}); "
            "give one weight per reward"
        )
    modules: dict[Path, Any] = {}
    loaded: list[RewardSpec] = []
    for spec, weight in zip(specs, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"train.reward_weights: {weight!r} (for {spec!r}) is not a finite number")
        name, fn = (spec, BUILTINS[spec]) if spec in BUILTINS else _file_reward(spec, modules)
        if any(r.name == name for r in loaded):
            raise ConfigError(
                f"train.rewards: {spec!r}: a second reward named {name!r} (metric names must differ)"
            )
        loaded.append(RewardSpec(name, fn, float(weight)))
    return loaded


def _file_reward(spec: str, modules: dict[Path, Any]) -> tuple[str, RewardFn]:
    where, _, attr = spec.rpartition(":")
    if not where.endswith(".py") or not attr.isidentifier():
        raise ConfigError(
            f"train.rewards: {spec!r} is neither a built-in reward ({', '.join(BUILTINS)}) "
            "nor path/to/file.py:function"
        )
    path = Path(where).expanduser().resolve()  # a relative path is taken from the current directory
    if not path.is_file():
        raise ConfigError(f"train.rewards: {spec!r}: file not found ({path})")
    if path not in modules:
        modules[path] = _import(path, spec)
    if not hasattr(modules[path], attr):
        raise ConfigError(f"train.rewards: {spec!r}: {path.name} has no function {attr!r}")
    fn = getattr(modules[path], attr)
    if not callable(fn):
        raise ConfigError(f"train.rewards: {spec!r}: {attr} is not callable ({type(fn).__name__})")
    if not _takes_columns(fn):
        raise ConfigError(
            f"train.rewards: {spec!r}: {attr} must take (prompts, completions, **kwargs) as TRL's reward "
            "functions do"
        )
    return attr, fn


def _takes_columns(fn: Callable) -> bool:
    """Whether `fn` takes `**kwargs` (every column, and TRL's extras, arrive as keywords); columns it names
    (`answer`) may be parameters of their own. True when there is no signature to inspect (C functions)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _import(path: Path, spec: str) -> Any:
    stem = re.sub(r"\W", "_", path.stem)
    name = f"llama_lora_reward_{next(_MODULE_IDS)}_{stem}"  # unique: two files may share a stem
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look a module up here while it runs
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise ConfigError(f"train.rewards: {spec!r}: importing {path.name} failed: {_one_line(exc)}") from exc
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# -- scoring ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """A batch's rewards: each reward's values (None: not applicable) and the weighted totals."""

    per_reward: dict[str, list[float | None]]
    total: list[float]

    @property
    def unscorable(self) -> list[int]:
        """Positions no reward applies to (total 0.0); TRL keeps them out of its baseline and logged reward."""
        columns = list(self.per_reward.values())
        return [i for i in range(len(self.total)) if all(c[i] is None for c in columns)]


def score(
    specs: list[RewardSpec],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    first_row: int = 0,
    rows: list[int] | None = None,
) -> Scores:
    """Every reward over a batch and the totals: per completion, the sum of weight x reward over the rewards
    that apply (TRL's `nansum`; 0.0 where none does). A RewardError names the dataset row: `rows[i]` for
    completion i where given (a row's completions share its number), else `first_row + i`."""
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in columns.values()):
        raise ValueError(f"prompts and every column must have one entry per completion ({n})")
    rows = rows if rows is not None else list(range(first_row, first_row + n))
    kwargs = {k: list(v) for k, v in columns.items() if k not in NOT_COLUMNS}
    per_reward = {s.name: _run(s, prompts, completions, kwargs, rows) for s in specs}
    total = [
        sum((s.weight * per_reward[s.name][i] for s in specs if per_reward[s.name][i] is not None), 0.0)
        for i in range(n)
    ]
    return Scores(per_reward, total)


def _span(rows: list[int]) -> str:
    low, high = min(rows), max(rows)
    return f"row {low}" if low == high else f"rows {low}-{high}"


def _run(spec: RewardSpec, prompts: list, completions: list, columns: dict, rows: list[int]) -> list:
    n, name = len(completions), spec.name
    try:
        out = spec.fn(prompts=prompts, completions=completions, **columns)
    except RowValueError as exc:
        raise RewardError(f"reward {name!r} at row {rows[exc.position]}: {_one_line(exc)}") from exc
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {_one_line(exc)} ({_span(rows)})") from exc
    if not isinstance(out, (list, tuple)):
        raise RewardError(
            f"reward {name!r} returned a {type(out).__name__}, not a list of rewards ({_span(rows)})"
        )
    if len(out) != n:
        raise RewardError(
            f"reward {name!r} returned the wrong number of rewards ({_span(rows)}): expected {n}, got {len(out)}"
        )
    return [_value(name, v, rows[i]) for i, v in enumerate(out)]


def _value(name: str, value: Any, row: int) -> float | None:
    """A returned reward as a float: None stays None, a bool counts as 0/1 (as torch.tensor takes it in TRL)."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except Exception:
        shown = repr(value).splitlines()[0][:60] if repr(value) else ""
        raise RewardError(
            f"reward {name!r} returned {shown} ({type(value).__name__}) at row {row}: not a number or None"
        ) from None
    if not math.isfinite(number):
        raise RewardError(f"reward {name!r} returned {number} at row {row}; return None for 'not applicable'")
    return number


def summary(scores: Scores, specs: list[RewardSpec]) -> dict[str, float]:
    """The batch's metrics under TRL's names: `rewards/<name>/mean` and `/std` over the values that apply,
    `reward` and `reward_std` over the totals of completions some reward applies to (std with Bessel's
    correction, NaN below two values, as TRL's `nanstd`), and `accuracy/<name>` (the mean) for a reward whose
    values are all 0 or 1."""
    metrics: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    for spec in specs:
        values = [v for v in scores.per_reward[spec.name] if v is not None]
        metrics[f"rewards/{spec.name}/mean"] = _mean(values)
        metrics[f"rewards/{spec.name}/std"] = _std(values)
        if values and all(v in (0.0, 1.0) for v in values):
            accuracy[f"accuracy/{spec.name}"] = _mean(values)
    unscorable = set(scores.unscorable)
    totals = [t for i, t in enumerate(scores.total) if i not in unscorable]
    metrics["reward"], metrics["reward_std"] = _mean(totals), _std(totals)
    return metrics | accuracy


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# -- sums across steps and processes (GRPO's metrics) -----------------------------------------------------


def reward_sums(specs, scores: Scores, totals: list[float], picked) -> dict[str, float]:
    """The picked completions' rewards as sums that add up across steps and processes: n, sum and sum of
    squares of each reward's values (None left out) and of the totals (NaN, no reward applied, left out),
    and per reward how many values are not 0 or 1 (`other`: it is an accuracy when there are none)."""
    picked = list(picked)
    out: dict[str, float] = {}

    def add(key: str, values: list[float]) -> None:
        out[f"{key}/n"], out[f"{key}/sum"] = len(values), sum(values)
        out[f"{key}/sum2"] = sum(v * v for v in values)

    for spec in specs:
        column = scores.per_reward[spec.name]
        values = [column[i] for i in picked if column[i] is not None]
        add(f"rewards/{spec.name}", values)
        out[f"rewards/{spec.name}/other"] = sum(v not in (0.0, 1.0) for v in values)
    add("reward", [totals[i] for i in picked if not math.isnan(totals[i])])
    return out


def reward_metrics(sums: dict[str, float], specs, prefix: str = "") -> dict[str, float]:
    """TRL's reward metrics from `reward_sums` (summed): `reward`, `reward_std`, `rewards/<name>/mean` and
    `/std`, and `accuracy/<name>` for a reward whose values were all 0 or 1; each name after `prefix`."""
    metrics = mean_std(sums, "reward", f"{prefix}reward", f"{prefix}reward_std")
    for spec in specs:
        key = f"rewards/{spec.name}"
        metrics |= mean_std(sums, key, f"{prefix}{key}/mean", f"{prefix}{key}/std")
        if sums.get(f"{key}/n") and not sums.get(f"{key}/other"):
            metrics[f"{prefix}accuracy/{spec.name}"] = metrics[f"{prefix}{key}/mean"]
    return metrics


def mean_std(sums: dict[str, float], key: str, mean_name: str, std_name: str) -> dict[str, float]:
    """Mean and standard deviation (Bessel's correction, NaN below two values) from `key`/n, /sum, /sum2."""
    n, s, s2 = sums.get(f"{key}/n", 0.0), sums.get(f"{key}/sum", 0.0), sums.get(f"{key}/sum2", 0.0)
    mean = s / n if n else math.nan
    std = math.sqrt(max(s2 - s * s / n, 0.0) / (n - 1)) if n > 1 else math.nan
    return {mean_name: mean, std_name: std}
