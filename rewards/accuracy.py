"""Answer-accuracy rewards: the extracted final answer against a reference column.

``math_accuracy`` looks for ``\\boxed{}`` first, then ``<answer>`` tags, then "The answer is X", then
``#### X``; ``task_accuracy`` (the built-in arithmetic task, whose completions end with
"The answer is N.") tries the phrase first. Both read the reference from the ``answer`` column
(``math_accuracy`` also accepts TRL's ``solution`` column) and return 1.0 / 0.0, or None for a row
whose reference is missing, which TRL and :class:`~align.rewards.runner.RewardRunner` treat as
"no reward for this sample".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._text import completion_text
from .answers import EXTRACTORS, answers_match, extract_answer, gold_answer

__all__ = ["AnswerAccuracy", "MissingColumnError", "column_values", "math_accuracy", "task_accuracy"]


class MissingColumnError(KeyError):
    """A reward needs a dataset column that the batch does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing column"


def column_values(columns: dict[str, Any], names: Sequence[str], n: int, reward: str, what: str) -> list[Any]:
    """The values of the first of ``names`` present (not None) in a reward call's ``columns``, one per completion.

    Raises :class:`MissingColumnError` (``"<reward> needs <what>; the batch has [...]"``) when none is there, and
    ``ValueError`` when the column does not hold ``n`` values."""
    for col in names:
        if columns.get(col) is not None:
            values = list(columns[col])
            if len(values) != n:
                raise ValueError(f"{reward}: column {col!r} has {len(values)} values for {n} completions")
            return values
    present = sorted(k for k in columns if not k.startswith("_"))
    raise MissingColumnError(f"{reward} needs {what}; the batch has {present}")


class AnswerAccuracy:
    """Reward ``correct`` when the completion's final answer matches the reference, else ``wrong``.

    Args:
        answer_columns: dataset columns holding the reference, tried in order (the first one present
            in the batch is used).
        order: extraction paths tried in order (see :mod:`align.rewards.answers`).
        use_math_verify: use ``math_verify`` for non-numeric answers when it is importable.
        correct: reward of a correct answer.
        wrong: reward of a wrong or missing answer.
        name: the name shown in logs (``__name__``).
    """

    def __init__(
        self,
        answer_columns: Sequence[str] = ("answer",),
        order: Sequence[str] = ("boxed", "answer_tag", "phrase", "hash"),
        *,
        use_math_verify: bool = True,
        correct: float = 1.0,
        wrong: float = 0.0,
        name: str = "answer_accuracy",
    ) -> None:
        if isinstance(answer_columns, str):
            answer_columns = (answer_columns,)
        if not answer_columns:
            raise ValueError("answer_columns must name at least one column")
        for path in order:
            if path not in EXTRACTORS:
                raise ValueError(f"unknown extraction path {path!r}; expected one of {sorted(EXTRACTORS)}")
        self.answer_columns = tuple(answer_columns)
        self.order = tuple(order)
        self.use_math_verify = use_math_verify
        self.correct = float(correct)
        self.wrong = float(wrong)
        self.__name__ = name

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> list[float | None]:
        """Score each completion against its reference (None where the reference is missing)."""
        completions = list(completions or [])
        refs = column_values(columns, self.answer_columns, len(completions), self.__name__,
                             f"a reference column {list(self.answer_columns)}")
        rewards: list[float | None] = []
        for completion, ref in zip(completions, refs, strict=True):
            gold = gold_answer(ref)
            if gold is None:
                rewards.append(None)
                continue
            pred = extract_answer(completion_text(completion), self.order)
            ok = answers_match(pred, gold, use_math_verify=self.use_math_verify)
            rewards.append(self.correct if ok else self.wrong)
        return rewards

    def __repr__(self) -> str:
        return f"AnswerAccuracy(name={self.__name__!r}, answer_columns={self.answer_columns}, order={self.order})"


math_accuracy = AnswerAccuracy(("answer", "solution"), name="math_accuracy")
task_accuracy = AnswerAccuracy(("answer",), ("phrase", "answer_tag", "boxed", "hash"), name="task_accuracy")
