"""Length shaping: DAPO's soft over-long punishment.

DAPO (Eq. 13), with ``L_max = max_completion_length`` and ``L_cache = soft_punish_cache``:

    R_length(y) = 0                                     if |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                  -1                                    if |y| > L_max

so the penalty ramps linearly from 0 to -1 over the last ``L_cache`` tokens of the budget. ``|y|`` is
the number of completion tokens without the trailing pad/EOS run (``pad_ids``); when a trainer
passes no token ids, it is the number of whitespace-separated words of the text (an approximation).
``truncated_penalty`` adds dLLM-RL's "over-long = wrong" rule: a completion that fills the whole
budget (``|y| >= L_max``, i.e. it was cut off) gets exactly that value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._text import as_id_lists, completion_text, strip_trailing

__all__ = ["SoftOverlongPunishment"]


class SoftOverlongPunishment:
    """DAPO soft over-long punishment (see the module docstring for the formula).

    Args:
        max_completion_length: ``L_max``, the generation budget in tokens.
        soft_punish_cache: ``L_cache``, the length of the linear ramp (0 <= L_cache <= L_max).
        pad_ids: EOS/pad ids whose trailing run is not counted in ``|y|``.
        scale: multiplies the reward (the most negative value is ``-scale``).
        truncated_penalty: if set, the reward of a completion with ``|y| >= L_max``.
    """

    __name__ = "soft_overlong_punishment"

    def __init__(
        self,
        max_completion_length: int,
        soft_punish_cache: int,
        *,
        pad_ids: Sequence[int] = (),
        scale: float = 1.0,
        truncated_penalty: float | None = None,
    ) -> None:
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be positive, got {max_completion_length}")
        if not 0 <= soft_punish_cache <= max_completion_length:
            raise ValueError(
                f"soft_punish_cache must be in [0, max_completion_length={max_completion_length}], "
                f"got {soft_punish_cache}"
            )
        self.max_completion_length = int(max_completion_length)
        self.soft_punish_cache = int(soft_punish_cache)
        self.pad_ids = tuple(int(i) for i in pad_ids)
        self.scale = float(scale)
        self.truncated_penalty = truncated_penalty

    def penalty(self, length: int) -> float:
        """``R_length`` for a completion of ``length`` tokens (DAPO Eq. 13, times ``scale``)."""
        l_max, l_cache = self.max_completion_length, self.soft_punish_cache
        if self.truncated_penalty is not None and length >= l_max:
            return float(self.truncated_penalty)
        if length <= l_max - l_cache:
            return 0.0
        if length <= l_max:
            return self.scale * ((l_max - l_cache) - length) / l_cache
        return -self.scale

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> list[float]:
        """One length reward per completion, from ``completion_ids`` when given, else from the text."""
        if completion_ids is not None:
            lengths = [len(strip_trailing(ids, self.pad_ids)) for ids in as_id_lists(completion_ids)]
        else:
            lengths = [len(completion_text(c).split()) for c in completions or []]
        return [self.penalty(n) for n in lengths]
