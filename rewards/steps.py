"""Process reward: partial credit for the worked steps of a solution.

``StepAccuracy`` reads the equations ``a ∘ b = c`` (``∘`` one of ``+ - * / x ×``) of a completion and of
the reference solution (a dataset column, ``completion`` by default; GSM8K-style ``<<a*b=c>>``
annotations are equations too) and returns the share of reference steps reproduced in place:

    r = #{i : eq_i(completion) = eq_i(reference)} / max(n_reference, n_completion)

so extra or missing steps cost credit, and a completion that reproduces every step scores 1. Numbers
are compared after the usual normalisation (``12.0`` = ``12``, ``1,200`` = ``1200``); the operator symbol
is compared as written except that ``x`` and ``×`` mean ``*``. A row whose reference has no equation
gets ``None`` (no reward for this sample). Combined with an answer reward it gives a dense signal when
few sampled completions reach the right final answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from ._text import completion_text
from .accuracy import column_values
from .answers import parse_number

__all__ = ["StepAccuracy", "equations"]

_NUM = r"-?\d[\d,]*(?:\.\d+)?"
EQUATION_RE = re.compile(rf"({_NUM})\s*([-+*/x×])\s*({_NUM})\s*=\s*({_NUM})")
_OPS = {"x": "*", "×": "*"}


def equations(text: str) -> list[tuple[Fraction | None, str, Fraction | None, Fraction | None]]:
    """The equations ``(a, op, b, c)`` of ``text`` in reading order (numbers normalised)."""
    return [(parse_number(a), _OPS.get(op, op), parse_number(b), parse_number(c))
            for a, op, b, c in EQUATION_RE.findall(text)]


class StepAccuracy:
    """Share of the reference solution's equations reproduced in place (see the module docstring).

    Args:
        reference_column: dataset column with the reference solution.
        name: the name shown in logs.
    """

    def __init__(self, reference_column: str = "completion", *, name: str = "step_accuracy") -> None:
        if not isinstance(reference_column, str) or not reference_column:
            raise ValueError("reference_column must be a column name")
        self.reference_column = reference_column
        self.__name__ = name

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 completion_ids: Any = None, **columns: Any) -> list[float | None]:
        completions = list(completions or [])
        refs = column_values(columns, (self.reference_column,), len(completions), self.__name__,
                             f"the reference column {self.reference_column!r}")
        out: list[float | None] = []
        for completion, ref in zip(completions, refs, strict=True):
            gold = equations(completion_text(ref)) if ref is not None else []
            if not gold:
                out.append(None)
                continue
            got = equations(completion_text(completion))
            hits = sum(g == r for g, r in zip(got, gold, strict=False))
            out.append(hits / max(len(gold), len(got)))
        return out

    def __repr__(self) -> str:
        return f"StepAccuracy(name={self.__name__!r}, reference_column={self.reference_column!r})"
