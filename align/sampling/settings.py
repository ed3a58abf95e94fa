"""Sampler settings of a recipe section (``eval`` and ``grpo`` share them), checked when built.

The fields mirror :func:`align.sampling.generate`; the choice lists come from the sampler itself
(:data:`~align.sampling.sampler.REMASKING`, :data:`~align.sampling.sampler.CACHE_MODES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.options import FieldError, check_choice, check_range
from align.sampling.loop_guard import LoopGuardConfig
from align.sampling.sampler import CACHE_MODES, REMASKING


@dataclass
class SamplerSettings:
    """How completions are decoded (``docs/concepts.md`` §5).

    Attributes:
        gen_length: generated tokens per completion ``L`` (the sampler fills every position; a completion
            ends at its first stop token).
        denoising_steps: denoising steps over the whole completion (a multiple of the number of blocks
            ``L / block_length``); the sampler's ``steps``.
        block_length: semi-autoregressive block size; divides ``gen_length``.
        temperature: ``0`` decodes greedily; ``> 0`` samples with Gumbel noise.
        remasking: which masked positions are committed first: ``low_confidence``, ``random``, ``margin`` or
            ``entropy``.
        threshold: commit every position whose confidence exceeds it (at least one per step); null = the fixed
            per-step schedule.
        cache: block KV cache: null (exact), ``prefix`` or ``dual``.
        cfg_scale: classifier-free guidance scale ``w``.
        loop_guard: decode-time loop guard (:class:`align.sampling.LoopGuardConfig`: ``enabled``, ``penalty``,
            ``max_remasks``, ``detection``); off by default.
    """

    gen_length: int = 32
    denoising_steps: int = 32
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0
    loop_guard: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gen, steps, block = self.gen_length, self.denoising_steps, self.block_length
        if gen < 1 or block < 1 or gen % block:
            raise FieldError("gen_length", f"({gen}) must be a positive multiple of 'block_length' ({block})",
                             ("block_length",))
        n_blocks = gen // block
        if steps < n_blocks or steps % n_blocks:
            raise FieldError("denoising_steps", f"({steps}) must be a positive multiple of the number of blocks "
                                                f"({n_blocks} = 'gen_length' / 'block_length')",
                             ("gen_length", "block_length"))
        check_range("temperature", self.temperature, low=0.0)
        check_choice("remasking", self.remasking, REMASKING)
        check_choice("cache", self.cache, CACHE_MODES)
        if self.threshold is not None:
            check_range("threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        check_range("cfg_scale", self.cfg_scale, low=0.0)
        if not isinstance(self.loop_guard, dict):
            raise FieldError("loop_guard", "must be a mapping (enabled, penalty, max_remasks, detection)")
        self.loop_guard_config()

    def loop_guard_config(self) -> LoopGuardConfig:
        """The validated :class:`~align.sampling.LoopGuardConfig` of ``loop_guard``."""
        return LoopGuardConfig.from_dict(self.loop_guard, "loop_guard")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`align.sampling.generate` for these settings (without the loop guard)."""
        return {"gen_length": self.gen_length, "steps": self.denoising_steps, "block_length": self.block_length,
                "temperature": self.temperature, "remasking": self.remasking, "threshold": self.threshold,
                "cache": self.cache, "cfg_scale": self.cfg_scale}
