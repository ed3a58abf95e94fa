"""Decode-time loop guard: an ``on_commit`` hook that undoes commitments closing a repetition loop.

After every denoising step the guard runs :func:`align.loops.loop_coverage` on the partly decoded
completions (still-masked positions match nothing, trailing EOS/pad runs are cut): the token-id rules only
(periodic and copy rules), the subset that runs on the tensors of every step; the text path that scores
evaluation and ``loop_penalty`` needs decoded text and is not used here. A token committed in
this step that lies inside a loop span *closed* the loop: the guard asks the sampler to remask it and to
lower the logit of the token it held there by ``penalty`` (``logit_v − λ·[v = rejected]``), so the next
step at that position prefers another candidate. Each position is remasked at most ``max_remasks`` times,
and the sampler honours remasks only before the last step of a block, so decoding always ends.

Use it through the samplers' settings (``eval.loop_guard``, ``grpo.loop_guard``, ``dlm-align generate
--loop-guard``) or directly::

    guard = LoopGuard(stop_ids=[eos_id], penalty=5.0)
    out = generate(model, ids, on_commit=guard, ...)
    guard.stats  # {"remasked": ..., "rows": ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from align.loops import LoopParams, loop_coverage
from align.options import FieldError
from align.sampling.sampler import Remask, SamplerState

__all__ = ["LoopGuard", "LoopGuardConfig", "LoopGuardConfigError"]


class LoopGuardConfigError(FieldError):
    """A loop-guard setting is out of range (``key`` names it, e.g. ``loop_guard.penalty``)."""


@dataclass(frozen=True)
class LoopGuardConfig:
    """Settings of :class:`LoopGuard` (the ``loop_guard`` section of ``eval`` / ``grpo``).

    Attributes:
        enabled: turn the guard on.
        penalty: ``λ``, subtracted from the logit of a rejected token at its position (``0`` = only remask).
        max_remasks: times one position may be remasked before the guard lets it stand.
        detection: keyword arguments of :func:`align.loops.loop_coverage` (``p_max``, ``k_min``,
            ``min_span``, ``k_counter``, ``counter_min_period``, ``copy_ngram``, ``copy_gap``,
            ``copy_min_span``); the defaults of :func:`align.loops.detect_loops`.
    """

    enabled: bool = False
    penalty: float = 5.0
    max_remasks: int = 2
    detection: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "loop_guard") -> LoopGuardConfig:
        """Build and validate from a recipe section; errors name the key."""
        d = dict(d or {})
        known = {"enabled", "penalty", "max_remasks", "detection"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LoopGuardConfigError(where, f"has unknown keys {unknown}; expected {sorted(known)}")
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "loop_guard") -> None:
        """Raise :class:`LoopGuardConfigError` naming the first bad key."""
        if not isinstance(self.enabled, bool):
            raise LoopGuardConfigError(f"{where}.enabled", f"must be true or false, got {self.enabled!r}")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, int | float) or not self.penalty >= 0:
            raise LoopGuardConfigError(f"{where}.penalty", f"must be a number >= 0, got {self.penalty!r}")
        if isinstance(self.max_remasks, bool) or not isinstance(self.max_remasks, int) or self.max_remasks < 1:
            raise LoopGuardConfigError(f"{where}.max_remasks", f"must be an int >= 1, got {self.max_remasks!r}")
        if not isinstance(self.detection, Mapping):
            raise LoopGuardConfigError(f"{where}.detection", "must be a mapping of loop-detection settings")
        bad = sorted(set(self.detection) - set(LoopParams.__dataclass_fields__))
        if bad:
            raise LoopGuardConfigError(f"{where}.detection", f"has unknown keys {bad}; expected "
                                       f"{sorted(LoopParams.__dataclass_fields__)}")
        try:
            LoopParams(**self.detection)
        except (TypeError, ValueError) as e:
            raise LoopGuardConfigError(f"{where}.detection", f"is invalid: {e}") from e

    def build(self, stop_ids: Sequence[int]) -> LoopGuard | None:
        """A fresh guard for one :func:`~align.sampling.generate` call, or ``None`` when disabled."""
        if not self.enabled:
            return None
        return LoopGuard(stop_ids=stop_ids, penalty=float(self.penalty), max_remasks=self.max_remasks,
                         **dict(self.detection))


class LoopGuard:
    """``on_commit`` hook that remasks tokens closing a loop and down-weights them (module docstring).

    Args:
        stop_ids: EOS / end-of-turn / pad ids (their trailing run is never a loop).
        penalty: ``λ`` for the rejected token at its position.
        max_remasks: remasks allowed per position.
        **detection: loop-detection settings (:class:`align.rewards.LoopParams` fields).

    Attributes:
        stats: ``remasked`` (positions remasked so far) and ``rows`` (rows in which the guard fired).
    """

    def __init__(self, *, stop_ids: Sequence[int] = (), penalty: float = 5.0, max_remasks: int = 2,
                 **detection: Any) -> None:
        LoopGuardConfig(True, penalty, max_remasks, detection).validate("LoopGuard")
        self.stop_ids = [int(t) for t in stop_ids]
        self.penalty = float(penalty)
        self.max_remasks = int(max_remasks)
        self.detection = dict(detection)
        self._count: torch.Tensor | None = None
        self._fired: torch.Tensor | None = None

    @property
    def stats(self) -> dict[str, int]:
        """Positions remasked and rows touched since the guard was built."""
        if self._count is None or self._fired is None:
            return {"remasked": 0, "rows": 0}
        return {"remasked": int(self._count.sum()), "rows": int(self._fired.sum())}

    def __call__(self, state: SamplerState) -> Remask | None:
        gen = state.sequences[:, state.prompt_length:]
        R, L = gen.shape
        if self._count is None or self._count.shape != (R, L):
            self._count = torch.zeros(R, L, dtype=torch.long, device=gen.device)
            self._fired = torch.zeros(R, dtype=torch.bool, device=gen.device)
        new = state.committed
        rows = new.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        # stop ids never form a loop here: mid-decode, EOS runs are split by masks before they become the tail
        cov = loop_coverage(gen.index_select(0, rows), pad_ids=self.stop_ids, unknown_ids=[state.mask_id],
                            ignore_ids=self.stop_ids, **self.detection).covered
        closing = torch.zeros_like(new)
        closing[rows] = cov & new.index_select(0, rows)
        closing &= self._count < self.max_remasks
        if not bool(closing.any()):
            return None
        self._count += closing.long()
        self._fired |= closing.any(dim=1)
        return Remask(closing, self.penalty)
