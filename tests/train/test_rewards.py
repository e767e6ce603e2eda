"""GRPO's rewards (train/rewards.py, train/reward_builtins.py): the built-ins on crafted completions, loading
user reward files, scoring a batch (errors naming reward and row, TRL's weighted nansum) and the summary."""

from __future__ import annotations

import math

import pytest

from llama_lora.errors import ConfigError, LlamaLoraError
from llama_lora.train import rewards
from llama_lora.train.rewards import (
    BUILTINS,
    DEFAULT_FORMAT_PATTERN,
    LENGTH_TARGET,
    RewardError,
    RewardSpec,
    Scores,
    load_rewards,
    score,
    summary,
)


def call(name: str, completions: list, **columns) -> list:
    return BUILTINS[name]([""] * len(completions), completions, **columns)


def fixed(values: list, name: str = "fixed", weight: float = 1.0) -> RewardSpec:
    """A reward that returns `values` whatever it is given."""
    return RewardSpec(name, lambda prompts, completions, **kw: list(values), weight)


# -- exact_answer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("Reasoning with 5 and 7.\nAnswer: 12", "12"),
        ("answer: 12 (from 3 x 4), not 13", "12 (from 3 x 4), not 13"),  # the whole line after the marker
        ("ANSWER: 40\n#### 41", "40"),  # the last "Answer:" wins over "####" and numbers after it
        ("Answer: 1 at first... final Answer: 2", "2"),  # the last marker
        ("3 + 4 = 7\n#### 7\nthat was 8 chars", "7"),  # "####" before the last number
        ("#### 5 then #### 6", "6"),
        ("So 3 + 4 = 7, then 7 * 2 = 14 apples.", "14"),  # no marker: the last number
        ("pages 3-5", "5"),  # a minus glued to a number is a dash
        ("no digits here", None),
    ],
)
def test_final_answer_extraction_order(completion, answer):
    assert rewards.final_answer(completion) == answer


@pytest.mark.parametrize("text", ["1,000", "1000", "1000.0", "$1,000", "1e3", " 1000. ", "1.0E+3"])
def test_numbers_are_normalised(text):
    assert call("exact_answer", [f"Answer: {text}"], answer=["1000"]) == [1.0]
    assert call("exact_answer", ["so it is 1000"], answer=[text]) == [1.0]


def test_negative_numbers_and_unicode_minus():
    got = call(
        "exact_answer", ["Answer: −3", "#### -3", "it fell to −3", "Answer: 3"], answer=[-3, "-3", "−3", "-3"]
    )
    assert got == [1.0, 1.0, 1.0, 0.0]


def test_text_answers_compare_stripped_and_case_folded():
    completions = ["Answer:   PARIS  ", "Answer: **Paris.**", "Answer: Lyon", "Answer: Paris, France"]
    assert call("exact_answer", completions, answer=["paris"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_exact_answer_rows_and_references():
    completions = ["Answer: 72", "Answer: 72", "nothing to extract", "Answer: 72", "Answer:"]
    answers = ["Natalia sold 48/2 = 24 clips... 48+24 = 72\n#### 72", None, "72", 72.0, "72"]
    assert call("exact_answer", completions, answer=answers) == [1.0, None, 0.0, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": "Answer: 9"}]]
    assert call("exact_answer", conversational, answer=["9"]) == [1.0]


def test_exact_answer_needs_an_answer_column():
    with pytest.raises(ValueError, match="needs an `answer` column"):
        call("exact_answer", ["Answer: 1"], solution=["1"])


# -- answer_format, length_penalty ---------------------------------------------------------------------


def test_answer_format_default_and_per_row_patterns():
    completions = ["Because 2+2.\nAnswer: 4\n", "Answer: -1,000.5", "Answer: four", "Answer: 4 apples", "4"]
    assert call("answer_format", completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert DEFAULT_FORMAT_PATTERN.endswith(r"\s*$")
    patterns = [r"^<think>.*</think>", None]
    assert call("answer_format", ["<think>hm</think> 4", "Answer: 4"], format_pattern=patterns) == [1.0, 1.0]
    assert call("answer_format", ["4", "4"], format_pattern=[r"^\d$", r"^\d\d$"]) == [1.0, 0.0]


def test_length_penalty_is_linear_between_the_target_and_twice_it():
    assert LENGTH_TARGET == 200
    lengths = [0, 200, 250, 300, 399, 400, 5000]
    got = call("length_penalty", ["a" * n for n in lengths])
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.995, -1.0, -1.0])
    assert all(math.copysign(1, v) == 1 for v in got[:2])  # 0.0, not -0.0
    assert call("length_penalty", ["a" * 15, "a" * 15], length_target=[10, None]) == [-0.5, 0.0]
    with pytest.raises(ValueError, match="length_target 0"):
        call("length_penalty", ["a"], length_target=[0])


# -- python_check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check, completion, expected",
    [
        ("x == 12", "Answer: 12", 1.0),
        ("x == 12", "Answer: 12.0", 1.0),
        ("x == 12", "#### 1,2", 1.0),
        ("abs(x - 3.5) < 0.01", "it is about 3.501", 1.0),
        ("abs(x - 3.5) < 0.01", "it is about 3.6", 0.0),
        ("x > 0 and x % 2 == 0 or x == -1", "Answer: 8", 1.0),
        ("not (x < 0)", "Answer: −2", 0.0),
        ("round(x, 1) == 2.5 and int(x) == 2", "Answer: 2.46", 1.0),
        ("min(x, 10) == 10 and max(x, 0) == x", "Answer: 1e2", 1.0),
        ("len(str(x)) == 3 and x in (100, 200)", "Answer: $100", 1.0),
        ("x ** 2 == 2 ** 4 and -x // 3 == -2", "Answer: 4", 1.0),
        ("float(x) == 0.5", "Answer: .5", 1.0),
        ("x == 'Paris'", "Answer: Paris", 1.0),
        ("x > 3", "Answer: Paris", 0.0),  # comparing text with a number: the answer does not fit
        ("1 / (x - 4) > 0", "Answer: 4", 0.0),  # division by zero
        ("x ** 10 ** 9 > 0", "Answer: 2", 0.0),  # refused as too large, not computed
        ("x == 1", "no answer here", 0.0),
    ],
)
def test_python_check_scores(check, completion, expected):
    assert call("python_check", [completion], check=[check]) == [expected]


@pytest.mark.parametrize(
    "check, named",
    [
        ("__import__('os').system('echo hi')", "calling __import__"),
        ("x.real == 3", "Attribute (x.real)"),
        ("x.__class__", "Attribute"),
        ("(1).__class__.__bases__", "Attribute"),
        ("x[0] == '1'", "Subscript"),
        ("open('/etc/passwd')", "calling open"),
        ("eval('1')", "calling eval"),
        ("(lambda: 1)()", "calling lambda"),
        ("[y for y in (1, 2)]", "ListComp"),
        ("y == 1", "the name 'y'"),
        ("abs == 1", "the name 'abs'"),
        ("f'{x}' == '1'", "JoinedStr"),
        ("x if x else 0", "IfExp"),
        ("(z := 3)", "NamedExpr"),
        ("max(**{'a': 1})", "** in a call"),
        ("x == ", "not a Python expression"),
    ],
)
def test_python_check_refuses_constructs(check, named):
    with pytest.raises(ValueError, match="not allowed|not a Python") as caught:
        call("python_check", ["Answer: 1"], check=[check])
    assert named in str(caught.value) and check in str(caught.value)
    assert "\n" not in str(caught.value)


def test_python_check_rows():
    assert call("python_check", ["Answer: 1", "no number"], check=[None, "x == 1"]) == [None, 0.0]
    with pytest.raises(ValueError, match="needs a `check` column"):
        call("python_check", ["Answer: 1"], answer=["1"])


# -- load_rewards ----------------------------------------------------------------------------------------

USER_FILE = """
import re

def has_think(prompts, completions, **kwargs):
    return [1.0 if "<think>" in c else 0.0 for c in completions]

def by_column(prompts, completions, bonus, **kwargs):
    return [b if b else None for b in bonus]

NOT_A_FUNCTION = 3

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "mine.py").write_text(USER_FILE)
    return "rw/mine.py"


def test_load_builtins_and_a_user_file(user_file, tmp_path):
    specs = load_rewards(
        ["exact_answer", f"{user_file}:has_think", f"{tmp_path}/rw/mine.py:by_column"], [2, 0.5, 1]
    )
    assert [(s.name, s.weight) for s in specs] == [
        ("exact_answer", 2.0),
        ("has_think", 0.5),
        ("by_column", 1.0),
    ]
    assert specs[0].fn is BUILTINS["exact_answer"]
    assert all(s.weight == 1.0 for s in load_rewards(["exact_answer", "length_penalty"], None))
    got = score(
        specs, ["p", "q"], ["<think>x</think> Answer: 3", "Answer: 4"], {"answer": [3, 5], "bonus": [0, 2]}
    )
    assert got.per_reward == {"exact_answer": [1.0, 0.0], "has_think": [1.0, 0.0], "by_column": [None, 2.0]}
    assert got.total == [2.5, 2.0]


def test_two_files_with_one_stem_load_as_two_modules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "r.py").write_text(
            f"def f{folder}(prompts, completions, **kw):\n    return [{value}]\n"
        )
    specs = load_rewards(["a/r.py:fa", "b/r.py:fb"])
    assert score(specs, ["p"], ["c"], {}).total == [3.0]


@pytest.mark.parametrize(
    "specs, weights, expected",
    [
        (["exact_anwser"], None, "is neither a built-in reward (exact_answer, answer_format, length_penalty"),
        (["missing.py:f"], None, "file not found"),
        (["{f}:nothing"], None, "mine.py has no function 'nothing'"),
        (["{f}:NOT_A_FUNCTION"], None, "NOT_A_FUNCTION is not callable (int)"),
        (["{f}:no_kwargs"], None, "must take (prompts, completions, **kwargs)"),
        (["{f}"], None, "path/to/file.py:function"),
        (["broken.py:f"], None, "importing broken.py failed: ZeroDivisionError: division by zero"),
        (["syntax.py:f"], None, "importing syntax.py failed: SyntaxError:"),
        (["exact_answer", "length_penalty"], [1.0], "2 rewards"),
        (["exact_answer"], [float("nan")], "nan"),
        (["exact_answer", "exact_answer"], None, "a second reward named 'exact_answer'"),
        ([], None, "empty"),
    ],
)
def test_load_errors_are_one_line_naming_the_spec(user_file, tmp_path, specs, weights, expected):
    (tmp_path / "broken.py").write_text("import os\nraise_it = 1 / 0\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    specs = [s.format(f=user_file) for s in specs]
    with pytest.raises(ConfigError) as caught:
        load_rewards(specs, weights)
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(("train.rewards: ", "train.reward_weights: "))
    assert all(repr(s) in message or s in message for s in specs[:1])


# -- score -----------------------------------------------------------------------------------------------


def test_total_is_trl_weighted_nansum():
    specs = [
        fixed([1.0, None, 0.5, None], "a", 2.0),
        fixed([0.0, -1.0, None, None], "b", 0.5),
        fixed([True, False, 3, None], "c", -1.0),  # bool counts as 1/0, as torch.tensor takes it in TRL
    ]
    got = score(specs, ["p"] * 4, ["c"] * 4, {})
    assert got.per_reward["c"] == [1.0, 0.0, 3.0, None]
    assert got.total == [2 * 1.0 + 0.5 * 0.0 - 1.0, 0.5 * -1.0 - 0.0, 2 * 0.5 - 3.0, 0.0]
    assert got.unscorable == [3]
    torch = pytest.importorskip("torch")
    table = torch.tensor(
        [[math.nan if v is None else float(v) for v in row] for row in zip(*got.per_reward.values())]
    )
    trl_total = (table * torch.tensor([2.0, 0.5, -1.0]).unsqueeze(0)).nansum(dim=1)  # grpo_trainer.py's line
    assert got.total == pytest.approx(trl_total.tolist())


def test_score_passes_columns_as_trl_does():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2"], "prompt": ["dropped", "dropped"], "completion_ids": [[1], [2]]}
    score([RewardSpec("spy", spy)], ["p1", "p2"], ["c1", "c2"], columns)
    assert seen == {"answer": ["1", "2"], "prompts": ["p1", "p2"], "completions": ["c1", "c2"]}
    with pytest.raises(ValueError, match="one entry per completion"):
        score([RewardSpec("spy", spy)], ["p1"], ["c1", "c2"], {})


def _raises(prompts, completions, **kw):
    raise ValueError("no such column\nsecond line")


@pytest.mark.parametrize(
    "fn, expected",
    [
        (_raises, "reward 'r' raised ValueError: no such column (rows 10-12)"),
        (
            lambda prompts, completions, **kw: 1.0,
            "reward 'r' returned a float, not a list of rewards (rows 10-12)",
        ),
        (
            lambda prompts, completions, **kw: [1.0, 2.0],
            "wrong number of rewards (rows 10-12): expected 3, got 2",
        ),
        (
            lambda prompts, completions, **kw: [1.0, "1.0", 2.0],
            "returned '1.0' (str) at row 11: not a number",
        ),
        (
            lambda prompts, completions, **kw: [1.0, 2.0, [1.0]],
            "returned [1.0] (list) at row 12: not a number",
        ),
        (lambda prompts, completions, **kw: [1.0, 2.0, 1j], "(complex) at row 12"),
        (lambda prompts, completions, **kw: [1.0, math.nan, 2.0], "returned nan at row 11"),
        (lambda prompts, completions, **kw: (math.inf, 1.0, 2.0), "returned inf at row 10"),
    ],
)
def test_score_errors_name_reward_and_row(fn, expected):
    with pytest.raises(RewardError) as caught:
        score([fixed([0.0] * 3, "ok"), RewardSpec("r", fn)], ["p"] * 3, ["c"] * 3, {}, first_row=10)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message
    assert isinstance(caught.value, LlamaLoraError)


def test_a_builtins_row_error_names_the_dataset_row():
    specs = load_rewards(["python_check"])
    checks = ["x == 1", "x.real == 1", "x == 2"]
    with pytest.raises(RewardError, match=r"reward 'python_check' at row 21: .*Attribute \(x.real\)"):
        score(specs, ["p"] * 3, ["Answer: 1"] * 3, {"check": checks}, first_row=20)
    with pytest.raises(
        RewardError, match=r"raised ValueError: exact_answer needs an `answer` column.*\(row 7\)"
    ):
        score(load_rewards(["exact_answer"]), ["p"], ["Answer: 1"], {}, first_row=7)


# -- summary ---------------------------------------------------------------------------------------------


def test_summary_uses_trls_names_and_skips_none():
    specs = [fixed([1.0, 0.0, None, None], "acc", 1.0), fixed([0.5, None, -0.5, None], "shaped", 2.0)]
    got = score(specs, ["p"] * 4, ["c"] * 4, {})
    assert got.total == [2.0, 0.0, -1.0, 0.0]
    metrics = summary(got, specs)
    assert set(metrics) == {
        "rewards/acc/mean",
        "rewards/acc/std",
        "rewards/shaped/mean",
        "rewards/shaped/std",
        "reward",
        "reward_std",
        "accuracy/acc",
    }
    assert metrics["rewards/acc/mean"] == metrics["accuracy/acc"] == 0.5
    assert metrics["rewards/acc/std"] == pytest.approx(math.sqrt(0.5))  # Bessel's correction, as TRL's nanstd
    assert metrics["rewards/shaped/mean"] == 0.0 and metrics["rewards/shaped/std"] == pytest.approx(
        math.sqrt(0.5)
    )
    assert metrics["reward"] == pytest.approx(1 / 3)  # the unscorable last row is left out, as in TRL 1.16
    assert metrics["reward_std"] == pytest.approx(math.sqrt(((5 / 3) ** 2 + (1 / 3) ** 2 + (4 / 3) ** 2) / 2))


def test_summary_matches_trls_nanstd_and_nan_cases():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch = pytest.importorskip("torch")
    values = [0.25, None, 1.5, -2.0, None, 0.0]
    metrics = summary(score([fixed(values, "v")], ["p"] * 6, ["c"] * 6, {}), [fixed(values, "v")])
    column = torch.tensor([math.nan if v is None else v for v in values])
    assert metrics["rewards/v/std"] == pytest.approx(trl_utils.nanstd(column).item())
    assert metrics["rewards/v/mean"] == pytest.approx(torch.nanmean(column).item())
    assert "accuracy/v" not in metrics
    single = summary(Scores({"s": [None, 1.0]}, [0.0, 1.0]), [fixed([], "s")])
    assert single["rewards/s/mean"] == 1.0 and math.isnan(
        single["rewards/s/std"]
    )  # TRL: NaN below two values
    assert math.isnan(summary(Scores({"s": [None]}, [0.0]), [fixed([], "s")])["reward"])
