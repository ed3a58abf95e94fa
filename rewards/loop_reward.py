"""``loop_penalty``: a reward built on :func:`~align.loops.detect_loops`.

With ``f`` the loop fraction of a completion (share of its tokens inside loop spans):

- ``shaping="linear"`` (default): ``r = -scale * f``. A completion that loops for half its length
  loses ``scale / 2``; text without loops is untouched.
- ``shaping="threshold"``: ``r = -scale`` if ``f > threshold`` else 0, for a flat penalty on any
  looping completion (``threshold=0``) or only on heavy loops.

Token ids come from ``completion_ids`` when the trainer passes them (trailing ``pad_ids`` are cut);
otherwise the completion text is split on whitespace and equal words get equal ids, which keeps
the repetition structure (``min_span`` then counts words).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from align.loops import (
    DEFAULT_COUNTER_MIN_PERIOD,
    DEFAULT_K_COUNTER,
    DEFAULT_K_MIN,
    DEFAULT_MIN_SPAN,
    DEFAULT_P_MAX,
    LoopParams,
    loop_coverage,
)

from ._text import as_id_lists, completion_text, whitespace_ids

__all__ = ["LoopPenalty", "loop_penalty"]

Shaping = Literal["linear", "threshold"]


class LoopPenalty:
    """Penalise repetition loops (see the module docstring for the shaping).

    Args:
        p_max, k_min, min_span, k_counter, counter_min_period: detection parameters (see
            :func:`~align.loops.detect_loops`).
        pad_ids: EOS/pad ids whose trailing run is not part of the completion.
        ignore_ids: ids that cannot form a loop on their own (e.g. whitespace tokens).
        shaping: ``"linear"`` or ``"threshold"``.
        threshold: loop fraction above which ``"threshold"`` shaping penalises.
        scale: size of the penalty (``>= 0``; the reward is ``<= 0``).
        source: ``"auto"`` (ids when given, else text), ``"ids"`` or ``"text"``.
    """

    __name__ = "loop_penalty"

    def __init__(
        self,
        *,
        p_max: int = DEFAULT_P_MAX,
        k_min: int = DEFAULT_K_MIN,
        min_span: int = DEFAULT_MIN_SPAN,
        k_counter: int | None = DEFAULT_K_COUNTER,
        counter_min_period: int = DEFAULT_COUNTER_MIN_PERIOD,
        pad_ids: Sequence[int] = (),
        ignore_ids: Sequence[int] = (),
        shaping: Shaping = "linear",
        threshold: float = 0.0,
        scale: float = 1.0,
        source: Literal["auto", "ids", "text"] = "auto",
    ) -> None:
        if shaping not in ("linear", "threshold"):
            raise ValueError(f"loop_penalty: shaping must be 'linear' or 'threshold', got {shaping!r}")
        if source not in ("auto", "ids", "text"):
            raise ValueError(f"loop_penalty: source must be 'auto', 'ids' or 'text', got {source!r}")
        if scale < 0:
            raise ValueError(f"loop_penalty: scale must be >= 0 (the reward is -scale * ...), got {scale}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"loop_penalty: threshold must be in [0, 1), got {threshold}")
        self.params = LoopParams(p_max, k_min, min_span, k_counter, counter_min_period)  # validates
        self.pad_ids = tuple(int(i) for i in pad_ids)
        self.ignore_ids = tuple(int(i) for i in ignore_ids)
        self.shaping: Shaping = shaping
        self.threshold = float(threshold)
        self.scale = float(scale)
        self.source = source

    @property
    def p_max(self) -> int:
        """Longest period tried."""
        return self.params.p_max

    def fractions(self, completions: Sequence[Any] | None, completion_ids: Any = None) -> list[float]:
        """Loop fraction of each completion."""
        use_ids = completion_ids is not None and self.source != "text"
        if self.source == "ids" and completion_ids is None:
            raise ValueError("loop_penalty: source='ids' but the trainer passed no completion_ids")
        if use_ids:
            ids = as_id_lists(completion_ids)
        else:
            ids = whitespace_ids([completion_text(c) for c in completions or []])
        if not ids:
            return []
        cov = loop_coverage(
            ids,
            pad_ids=self.pad_ids if use_ids else (),
            ignore_ids=self.ignore_ids if use_ids else (),
            p_max=self.params.p_max,
            k_min=self.params.k_min,
            min_span=self.params.min_span,
            k_counter=self.params.k_counter,
            counter_min_period=self.params.counter_min_period,
        )
        return cov.fraction.tolist()

    def shape(self, fraction: float) -> float:
        """The reward for a loop fraction ``f`` (module docstring)."""
        if self.shaping == "threshold":
            return -self.scale if fraction > self.threshold else 0.0
        return -self.scale * fraction

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> list[float]:
        """One penalty (<= 0) per completion."""
        return [self.shape(f) + 0.0 for f in self.fractions(completions, completion_ids)]

    def __repr__(self) -> str:
        return f"LoopPenalty({self.params}, shaping={self.shaping!r}, threshold={self.threshold}, scale={self.scale})"


#: Ready instance with the default parameters.
loop_penalty = LoopPenalty()
