"""Countdown: is a completion's final expression a solution of the problem (the numbers and the target)?

A Countdown problem gives a few numbers and a target; a solution is an arithmetic expression that uses every
number exactly once, only ``+ - * /`` and parentheses, and equals the target. The reference of a problem is the
JSON text ``{"numbers": [...], "target": T}``, as :mod:`align.data.countdown` writes it into the ``answer``
column (for training and evaluation alike).

:class:`CountdownChecker` decides (the ``countdown`` checker of evaluation); :class:`CountdownAccuracy` is the
same decision as a reward (registered as ``countdown``): 1.0 when the checker accepts the completion, else 0.0.
The expression is parsed with :mod:`ast` and evaluated on fractions by walking the tree; it is never executed.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ._text import completion_text
from .accuracy import column_values
from .answers import extract_answer

__all__ = ["CountdownAccuracy", "CountdownChecker", "countdown_accuracy"]

_COUNTDOWN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _countdown_value(node: ast.AST, used: list[int]) -> Any:
    if isinstance(node, ast.Expression):
        return _countdown_value(node.body, used)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:
        return _COUNTDOWN_OPS[type(node.op)](_countdown_value(node.left, used), _countdown_value(node.right, used))
    raise ValueError("not an arithmetic expression of integers with + - * /")


class CountdownChecker:
    """Countdown: the reference is ``{"numbers": [...], "target": T}`` (JSON text); the completion's final
    expression (``\\boxed{}``, ``<answer>`` or "The answer is", without an ``= T`` tail) must use every number
    exactly once, only ``+ - * /`` and parentheses, and equal T exactly (fractions, no rounding)."""

    name = "countdown"

    def __call__(self, text: str, reference: str) -> tuple[str | None, bool]:
        ref = json.loads(reference)
        pred = extract_answer(text, ("boxed", "answer_tag", "phrase"))
        if pred is None:
            return None, False
        expr = pred.split("=")[0].replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
        expr = expr.replace("×", "*").replace("÷", "/").strip()
        used: list[int] = []
        try:
            value = _countdown_value(ast.parse(expr, mode="eval"), used)
        except (SyntaxError, ValueError, ZeroDivisionError):
            return pred, False
        return pred, sorted(used) == sorted(int(x) for x in ref["numbers"]) and value == int(ref["target"])


def _reference(value: Any, name: str) -> str | None:
    """The JSON text of a Countdown reference cell (JSON text or a mapping), None for a missing one; anything that
    is not ``{"numbers": [integers], "target": integer}`` raises ``ValueError`` naming the reward."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        ref = json.loads(value) if isinstance(value, str) else value
        ok = (isinstance(ref, Mapping) and isinstance(ref.get("numbers"), list)
              and all(isinstance(x, int) and not isinstance(x, bool) for x in [*ref["numbers"], ref.get("target")]))
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: the reference {value!r} is not a Countdown problem "
                         '({"numbers": [integers], "target": integer}, as data.format: countdown writes it)')
    return value if isinstance(value, str) else json.dumps(dict(ref))


class CountdownAccuracy:
    """Reward 1.0 when :class:`CountdownChecker` accepts the completion for the row's problem, else 0.0.

    Args:
        answer_column: the column holding the problem, ``{"numbers": [...], "target": T}`` as JSON text (or a
            mapping); ``data.format: countdown`` writes it into ``answer``.
        name: the name shown in logs (``__name__``).

    A row whose reference is missing (null or empty) gets None, no reward for that sample; a reference that is
    not a Countdown problem raises ``ValueError`` (the reward runner's ``on_error`` then applies).
    """

    def __init__(self, answer_column: str = "answer", *, name: str = "countdown") -> None:
        if not isinstance(answer_column, str) or not answer_column:
            raise ValueError(f"answer_column must name a column, got {answer_column!r}")
        self.answer_column = answer_column
        self.__name__ = name

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 completion_ids: Any = None, **columns: Any) -> list[float | None]:
        """Score each completion against its row's problem (None where the problem is missing)."""
        completions = list(completions or [])
        refs = column_values(columns, (self.answer_column,), len(completions), self.__name__,
                             f"the column {self.answer_column!r} (the numbers and the target as JSON)")
        check = CountdownChecker()
        out: list[float | None] = []
        for completion, raw in zip(completions, refs, strict=True):
            ref = _reference(raw, self.__name__)
            out.append(None if ref is None else float(check(completion_text(completion), ref)[1]))
        return out

    def __repr__(self) -> str:
        return f"CountdownAccuracy(answer_column={self.answer_column!r})"


countdown_accuracy = CountdownAccuracy()
