"""``loop_penalty``: a reward built on the loop detectors (``docs/concepts.md`` §6).

With ``f`` the loop fraction of a completion (share of it inside loops):

- ``shaping="linear"`` (default): ``r = -scale * f``. A completion that loops for half its length
  loses ``scale / 2``; text without loops is untouched.
- ``shaping="threshold"``: ``r = -scale`` if ``f > threshold`` else 0, for a flat penalty on any
  looping completion (``threshold=0``) or only on heavy loops.

Which detector (``source``):

- ``"text"``: :func:`align.loops_text.detect_text_loops` on the completion text: lines and sentences
  matched as near copies, plus short periodic loops over words; independent of the tokenizer, and the
  most accurate on real diffusion-model loops (``docs/benchmarks.md``, "Loop detection"). ``f`` is the
  share of the text's non-space characters inside loops. The evaluation's loop rate uses the same path.
- ``"ids"``: :func:`align.loops.loop_coverage` on ``completion_ids`` (trailing ``pad_ids`` cut): the
  periodic and copy rules on tokens. ``f`` is the share of tokens inside loops.
- ``"both"``: the larger of the two fractions.
- ``"auto"`` (default): ``"text"`` when the trainer passes completions (every trainer of dlm-align does),
  else ``"ids"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

from align.loops import (
    DEFAULT_COPY_GAP,
    DEFAULT_COPY_NGRAM,
    DEFAULT_COUNTER_MIN_PERIOD,
    DEFAULT_K_COUNTER,
    DEFAULT_K_MIN,
    DEFAULT_MIN_SPAN,
    DEFAULT_P_MAX,
    LoopParams,
    loop_coverage,
)
from align.loops_text import TextLoopParams, detect_text_loops

from ._text import as_id_lists, completion_text

__all__ = ["LoopPenalty", "loop_penalty"]

Shaping = Literal["linear", "threshold"]
Source = Literal["auto", "ids", "text", "both"]
_TEXT = TextLoopParams()


class LoopPenalty:
    """Penalise repetition loops (see the module docstring for the shaping).

    Args:
        p_max, k_min, min_span, k_counter, counter_min_period, copy_ngram, copy_gap, copy_min_span:
            token-id detection (see :func:`~align.loops.detect_loops`).
        min_block_words, min_loop_words, word_sim, number_sim, word_min_span: text detection (see
            :class:`~align.loops_text.TextLoopParams`; ``k_min`` is shared).
        pad_ids: EOS/pad ids whose trailing run is not part of the completion.
        ignore_ids: ids that cannot form a loop on their own (e.g. whitespace tokens).
        shaping: ``"linear"`` or ``"threshold"``.
        threshold: loop fraction above which ``"threshold"`` shaping penalises.
        scale: size of the penalty (``>= 0``; the reward is ``<= 0``).
        source: ``"auto"`` (the text when the trainer passes completions, else the token ids), ``"text"``,
            ``"ids"`` or ``"both"``.
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
        copy_ngram: int = DEFAULT_COPY_NGRAM,
        copy_gap: int = DEFAULT_COPY_GAP,
        copy_min_span: int | None = None,
        min_block_words: int = _TEXT.min_block_words,
        min_loop_words: int = _TEXT.min_loop_words,
        word_sim: float = _TEXT.word_sim,
        number_sim: float = _TEXT.number_sim,
        word_min_span: int = _TEXT.word_min_span,
        pad_ids: Sequence[int] = (),
        ignore_ids: Sequence[int] = (),
        shaping: Shaping = "linear",
        threshold: float = 0.0,
        scale: float = 1.0,
        source: Source = "auto",
    ) -> None:
        if shaping not in ("linear", "threshold"):
            raise ValueError(f"loop_penalty: shaping must be 'linear' or 'threshold', got {shaping!r}")
        if source not in ("auto", "ids", "text", "both"):
            raise ValueError(f"loop_penalty: source must be 'auto', 'ids', 'text' or 'both', got {source!r}")
        if scale < 0:
            raise ValueError(f"loop_penalty: scale must be >= 0 (the reward is -scale * ...), got {scale}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"loop_penalty: threshold must be in [0, 1), got {threshold}")
        self.params = LoopParams(p_max, k_min, min_span, k_counter, counter_min_period, copy_ngram, copy_gap,
                                 copy_min_span)  # validates
        self.text_params = TextLoopParams(k_min, min_block_words, min_loop_words, word_sim, number_sim,
                                          word_min_span=word_min_span)
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

    def fractions(self, completions: Sequence[Any] | None, completion_ids: Any = None, *,
                  source: Source | None = None) -> list[float]:
        """Loop fraction of each completion (module docstring), from ``source`` (default: the penalty's own)."""
        asked = source or self.source
        source = asked
        if source == "auto":
            source = "text" if completions is not None else "ids"
        if source in ("ids", "both") and completion_ids is None:
            if asked != "auto":
                raise ValueError(f"loop_penalty: source={asked!r} but the trainer passed no completion_ids")
            return []
        out: list[float] | None = None
        if source in ("text", "both"):
            texts = [completion_text(c) for c in completions or []]
            out = [r.fraction for r in detect_text_loops(texts, self.text_params)]
        if source in ("ids", "both"):
            ids = as_id_lists(completion_ids)
            cov = loop_coverage(ids, pad_ids=self.pad_ids, ignore_ids=self.ignore_ids, **asdict(self.params)) \
                if ids else None
            frac = cov.fraction.tolist() if cov is not None else []
            out = frac if out is None else [max(a, b) for a, b in zip(out, frac)]
        return out or []

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
        return (f"LoopPenalty({self.params}, {self.text_params}, source={self.source!r}, shaping={self.shaping!r}, "
                f"threshold={self.threshold}, scale={self.scale})")


#: Ready instance with the default parameters.
loop_penalty = LoopPenalty()
