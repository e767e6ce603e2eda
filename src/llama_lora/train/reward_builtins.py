"""The built-in rewards of `rewards.py` (`rewards.BUILTINS`), each a TRL reward function
(`fn(prompts, completions, **columns) -> list[float | None]`), and what they share: the final answer of a
completion (`final_answer`), answers compared as numbers or text (`normalise`), and python_check's checks,
parsed with `ast` and evaluated by walking the tree (`parse_check`), so a check can call nothing but
`CHECK_CALLS` and cannot hang a run.
"""

from __future__ import annotations

import ast
import builtins
import functools
import numbers
import operator
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

LENGTH_TARGET = 200  # characters; length_penalty is 0.0 up to here, -1.0 from twice this on
DEFAULT_FORMAT_PATTERN = r"(?is)^.*\bAnswer:\s*-?[\d,]+(\.\d+)?\s*$"  # ends with "Answer: <number>"
CHECK_CALLS = {
    name: getattr(builtins, name) for name in ("abs", "round", "int", "float", "min", "max", "len", "str")
}


class RowValueError(ValueError):
    """A ValueError about one completion of the batch (at `position`); `rewards.score` names its row."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


# -- final answers ---------------------------------------------------------------------------------------

_ANSWER = re.compile(r"\banswer:", re.IGNORECASE)
# a number in running text: 1,000 / 3.5 / 1e3 / $1,000 / -3 / −3 (a minus not glued to a word: "3-5" is 3, 5)
_NUMBER = re.compile(r"(?:(?<![\w)])[-\u2212])?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _text(completion: Any) -> str:
    """A completion's text: the string, or the last message's content (TRL's conversational form)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _after(text: str, start: int) -> str | None:
    """The first non-empty line after `start`, without surrounding `*` (markdown bold) or a final stop."""
    rest = text[start:].strip().strip("*").strip()
    line = rest.splitlines()[0].strip().rstrip(".").strip() if rest else ""
    return line or None


def final_answer(text: str) -> str | None:
    """The final answer of a completion: the line after the last "Answer:" (any case), else after the last
    "####", else the last number in the text; None when there is none."""
    marks = list(_ANSWER.finditer(text))
    if marks:
        return _after(text, marks[-1].end())
    if "####" in text:
        return _after(text, text.rindex("####") + 4)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _plain_number(text: str) -> str | None:
    """`text` as a plain number string ("$1,000" -> "1000", "−3" -> "-3"), or None when it is not one."""
    compact = re.sub(r"[$,\s]", "", text.replace("\u2212", "-"))
    return compact if _PLAIN_NUMBER.fullmatch(compact) else None


def normalise(value: Any) -> Decimal | str:
    """An answer for comparison: a number as an exact Decimal ("1,000", "1000.0", "$1,000", "1e3" all equal
    1000), anything else stripped and case-folded, without a final full stop."""
    text = str(value).strip().rstrip(".").strip()
    number = _plain_number(text)
    return Decimal(number) if number is not None else text.casefold()


def _reference(answer: Any) -> Any:
    """A reference answer: its final answer when it carries an "Answer:" or "####" marker (GSM8K's answer
    column is the worked solution ending "#### 72"), else the whole value."""
    text = str(answer)
    return final_answer(text) if _ANSWER.search(text) or "####" in text else answer


def _column(columns: dict[str, list], name: str, reward: str) -> list:
    if name not in columns:
        article = "an" if name[0] in "aeiou" else "a"
        have = ", ".join(columns) or "none"
        raise ValueError(f"{reward} needs {article} `{name}` column (the dataset has: {have})")
    return columns[name]


# -- the built-in rewards --------------------------------------------------------------------------------


def exact_answer(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's `answer` column, else 0.0 (also when no answer
    can be extracted); None where the row's answer is None. The final answer is the line after the last
    "Answer:" (any case), else after the last "####", else the last number in the completion; a reference
    with such a marker is cut the same way. Both sides go through `normalise`: numbers compare as numbers
    ("1,000" = "1000" = "1000.0" = "$1,000" = "1e3"; "-3" = "−3"), other answers as stripped, case-folded
    strings. A dataset without an `answer` column is a ValueError."""
    answers = _column(columns, "answer", "exact_answer")
    scores: list[float | None] = []
    for completion, reference in zip(completions, answers):
        if reference is None:
            scores.append(None)
            continue
        got, want = final_answer(_text(completion)), _reference(reference)
        scores.append(float(got is not None and want is not None and normalise(got) == normalise(want)))
    return scores


def answer_format(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion matches the row's `format_pattern` regex (`re.search`: anchor it with ^ and $
    to match the whole completion), else 0.0. Without that column, or where it is None, the pattern is
    `DEFAULT_FORMAT_PATTERN`: the completion ends with "Answer: <number>" (trailing whitespace allowed)."""
    patterns = columns.get("format_pattern") or [None] * len(completions)
    scores: list[float | None] = []
    for position, (completion, pattern) in enumerate(zip(completions, patterns)):
        try:
            found = re.search(pattern or DEFAULT_FORMAT_PATTERN, _text(completion))
        except re.error as exc:
            raise RowValueError(position, f"format_pattern {pattern!r} is not a regex: {exc}") from None
        scores.append(float(found is not None))
    return scores


def length_penalty(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """A penalty on the completion's length in characters, L, against a target T (`LENGTH_TARGET`, or the
    row's `length_target` column where it is not None): 0.0 for L <= T, -(L - T) / T between T and 2T
    (falling linearly to -1.0), -1.0 for L >= 2T. Never positive: it only discourages rambling."""
    targets = columns.get("length_target") or [None] * len(completions)
    scores: list[float | None] = []
    for position, (completion, target) in enumerate(zip(completions, targets)):
        target = LENGTH_TARGET if target is None else target
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not target > 0:
            raise RowValueError(position, f"length_target {target!r} is not a positive number")
        over = (len(_text(completion)) - target) / target
        scores.append(0.0 - min(max(over, 0.0), 1.0))  # "0.0 -": 0.0, not -0.0, within the target
    return scores


def python_check(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the row's `check` column, a Python expression over `x` (such as "x == 12" or
    "abs(x - 3.5) < 0.01"), is truthy for the completion's final answer, else 0.0; None where `check` is None.
    `x` is the final answer as `exact_answer` extracts it: an int or float where it is a number ("$1,000" ->
    1000), else the text. No answer, or an error evaluating the check on this answer (comparing text with a
    number, dividing by zero), scores 0.0. The check is parsed with `ast` and may use only literals, `x`,
    comparisons, and/or/not, + - * / // % ** and unary minus, and calls to abs, round, int, float, min,
    max, len and str; anything else is a ValueError naming it, whatever the completion."""
    checks = _column(columns, "check", "python_check")
    scores: list[float | None] = []
    for position, (completion, check) in enumerate(zip(completions, checks)):
        if check is None:
            scores.append(None)
            continue
        try:
            tree = parse_check(str(check))
        except ValueError as exc:
            raise RowValueError(position, str(exc)) from None
        answer = final_answer(_text(completion))
        if answer is None:
            scores.append(0.0)
            continue
        try:
            scores.append(float(bool(_evaluate(tree, _as_x(answer)))))
        except (ArithmeticError, TypeError, ValueError):
            scores.append(0.0)  # the answer does not fit the check (text where a number is expected, ...)
    return scores


# -- python_check's expressions ----------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_BINARY |= {ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le}
_COMPARE |= {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b}
_COMPARE[ast.NotIn] = lambda a, b: a not in b
_NODES = {ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.Load, ast.BoolOp, ast.And, ast.Or, ast.BinOp}
_NODES |= {ast.UnaryOp, ast.Compare, *_BINARY, *_UNARY, *_COMPARE}
_MAX_SIZE = 100_000  # bits of an int power, items of a repeated string or list: a check cannot hang a run


def _as_x(answer: str) -> int | float | str:
    number = _plain_number(answer)
    if number is None:
        return answer
    return int(number) if re.fullmatch(r"[-+]?\d+", number) else float(number)


@functools.lru_cache(maxsize=1024)
def parse_check(source: str) -> ast.Expression:
    """`source` parsed as an expression, every node checked against what a check may use (ValueError)."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"check {source!r} is not a Python expression ({exc.msg})") from None
    _allow(tree, source)
    return tree


def _allow(node: ast.AST, source: str) -> None:
    def refuse(what: str) -> ValueError:
        return ValueError(
            f"check {source!r}: {what} is not allowed (a check may use literals, x, comparisons, and/or/not, "
            f"arithmetic, and calls to {', '.join(CHECK_CALLS)})"
        )

    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in CHECK_CALLS):
            raise refuse(f"calling {ast.unparse(node.func)}")
        if any(k.arg is None for k in node.keywords):
            raise refuse("** in a call")
        children = [*node.args, *(k.value for k in node.keywords)]
    elif isinstance(node, ast.Name):
        if node.id != "x":
            raise refuse(f"the name {node.id!r} (only x)")
        children = []
    elif type(node) not in _NODES:
        shown = f" ({ast.unparse(node)})" if isinstance(node, ast.expr) else ""
        raise refuse(f"{type(node).__name__}{shown}")
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        _allow(child, source)


def _evaluate(node: ast.AST, x: Any) -> Any:
    """A checked expression's value with `x` bound; only `CHECK_CALLS` can be called."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, x)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return x
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(e, x) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.BoolOp):
        value = None
        for operand in node.values:  # short-circuit as Python does, returning the deciding operand
            value = _evaluate(operand, x)
            if bool(value) != isinstance(node.op, ast.And):
                return value
        return value
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, x))
    if isinstance(node, ast.BinOp):
        return _binary(node.op, _evaluate(node.left, x), _evaluate(node.right, x))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, x)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, x)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    assert isinstance(node, ast.Call)  # _allow let nothing else through
    args = [_evaluate(a, x) for a in node.args]
    return CHECK_CALLS[node.func.id](*args, **{k.arg: _evaluate(k.value, x) for k in node.keywords})


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
        if abs(right) * max(left.bit_length(), 1) > _MAX_SIZE:
            raise ValueError("power too large")
    if isinstance(op, ast.Mult):
        for seq, count in ((left, right), (right, left)):
            if (
                isinstance(seq, (str, list, tuple))
                and isinstance(count, int)
                and len(seq) * count > _MAX_SIZE
            ):
                raise ValueError("repetition too large")
    return _BINARY[type(op)](left, right)
