"""Countdown rows: a few numbers and a target, turned into the prompt and the reference that training and
evaluation both use.

A Countdown row holds its numbers in ``input`` (``"44,19,35"``, as d1's ``countdown_cd3_test.jsonl`` has them),
``nums`` or ``numbers`` (a list), and its target in ``output`` or ``target``; the first of these columns present is
read. :func:`countdown_problem` builds the prompt from :data:`COUNTDOWN_PROMPT` and the reference
``{"numbers": [...], "target": T}`` (JSON text) that the ``countdown`` checker and reward read
(:mod:`align.rewards.countdown`); :func:`countdown_row` adds them to the row as its ``prompt`` and ``answer``
columns, next to the row's own columns. ``dlm-align eval --format countdown`` and a recipe's ``data.format: countdown``
(the rows of ``data.train_files`` and ``data.eval_files``) go through :func:`countdown_rows`, so a prompt trained on
is the prompt evaluated.

A row without numbers or a target, or whose values are not integers (numbers: non-negative integers, at least one),
is a bad row, named with its file and line and reported like every other bad row (``data.bad_rows``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from align.data.checks import RawRows, RowProblem
from align.data.formatting import DataFormatError, row_error

#: ``data.format`` of Countdown rows (besides the formats of :mod:`align.data.formatting`).
COUNTDOWN_FORMAT = "countdown"
#: Columns a Countdown row may hold its numbers / target in (the first present is used).
COUNTDOWN_NUMBERS = ("input", "nums", "numbers")
COUNTDOWN_TARGET = ("output", "target")
#: The prompt of a Countdown problem (``numbers`` is shown as a Python list, ``[44, 19, 35]``).
COUNTDOWN_PROMPT = ("Using the numbers {numbers}, write an arithmetic expression that equals {target}. Use each "
                    "number exactly once and only +, -, * and /. Give the expression, without '=', in \\boxed{{}}.")

_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def _integer(value: Any) -> int | None:
    """``value`` as an integer when it is one (an int, an integral float, or the text of an integer), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _column(row: Mapping[str, Any], columns: tuple[str, ...], what: str, where: str) -> tuple[str, Any]:
    col = next((c for c in columns if c in row), None)
    if col is None:
        raise row_error(where, f"a countdown row needs {what} in '{columns[0]}'"
                               f"{''.join(f' or {c!r}' for c in columns[1:])}; columns: {sorted(row)}",
                        field=columns[0], kind="missing field")
    if row[col] is None:
        raise row_error(where, f"field '{col}' is null", field=col, kind="null field")
    return col, row[col]


def countdown_numbers(row: Mapping[str, Any], where: str) -> tuple[list[int], int]:
    """``(numbers, target)`` of a Countdown row; a missing, null, empty or non-integer value raises
    :class:`~align.data.formatting.DataFormatError` naming ``where`` and the field."""
    col, raw = _column(row, COUNTDOWN_NUMBERS, "numbers", where)
    if isinstance(raw, str):
        if not raw.strip():
            raise row_error(where, f"field '{col}' is {'empty' if not raw else 'whitespace only'}", field=col,
                            kind="empty string")
        items: list[Any] = raw.split(",")
    elif isinstance(raw, list):
        if not raw:
            raise row_error(where, f"field '{col}' is an empty list", field=col, kind="empty string")
        items = raw
    else:
        raise row_error(where, f"field '{col}' must be comma-separated integers or a list of integers, got "
                               f"{type(raw).__name__}", field=col, kind="wrong type")
    numbers = [_integer(x) for x in items]
    if any(n is None or n < 0 for n in numbers):
        raise row_error(where, f"field '{col}' must hold non-negative integers, got {raw!r}", field=col,
                        kind="wrong type")
    tcol, traw = _column(row, COUNTDOWN_TARGET, "a target", where)
    target = _integer(traw)
    if target is None:
        raise row_error(where, f"field '{tcol}' must be an integer, got {traw!r}", field=tcol, kind="wrong type")
    return [int(n) for n in numbers if n is not None], target


def countdown_problem(row: Mapping[str, Any], where: str) -> dict[str, str]:
    """The ``prompt`` (:data:`COUNTDOWN_PROMPT`) and ``answer`` (``{"numbers": [...], "target": T}`` as JSON text)
    of a Countdown row (:func:`countdown_numbers` checks it)."""
    numbers, target = countdown_numbers(row, where)
    return {"prompt": COUNTDOWN_PROMPT.format(numbers=numbers, target=target),
            "answer": json.dumps({"numbers": numbers, "target": target})}


def countdown_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A Countdown row with its ``prompt`` and ``answer`` (:func:`countdown_problem`) added; its own columns are kept
    (rewards receive them by name). A row that already has a ``prompt`` or ``answer`` column is not taken as a
    Countdown row: the built columns would replace it."""
    taken = [c for c in ("prompt", "answer") if c in row]
    if taken:
        raise row_error(where, f"has its own '{taken[0]}' column, which a countdown row gets from its numbers and "
                               "target; rename it", field=taken[0], kind="invalid row")
    return {**row, **countdown_problem(row, where)}


def countdown_rows(raw: RawRows) -> RawRows:
    """Rows read from files (:func:`~align.data.checks.read_rows`) with their ``prompt`` and ``answer``
    (:func:`countdown_row`), in order and at the same places. A row that is not a Countdown problem is left out
    and becomes a problem of the result, as a line that is not a row is: the caller's ``data.bad_rows`` policy
    (:func:`~align.data.checks.settle`) reports or skips it with the others."""
    out = RawRows()
    events: list[tuple[float, RowProblem | None, int]] = [(p.order, p, -1) for p in raw.problems]
    events += [(float(i), None, i) for i in range(len(raw.rows))]
    for _, problem, i in sorted(events, key=lambda e: e[0]):
        if problem is not None:
            out.problems.append(RowProblem(problem.where, problem.reason, problem.kind, problem.field, None,
                                           len(out.rows)))
            continue
        try:
            row = countdown_row(raw.rows[i], raw.places[i])
        except DataFormatError as err:
            out.problems.append(RowProblem(raw.places[i], err.reason, err.kind, err.field, None, len(out.rows)))
            continue
        out.rows.append(row)
        out.places.append(raw.places[i])
    return out
