"""Batched denoising rollouts (``docs/concepts.md`` §5).

* :mod:`align.sampling.sampler` — :func:`generate`, the semi-autoregressive sampler, and its choice lists
  (:data:`REMASKING`, :data:`CACHE_MODES`, :data:`EOS_POLICIES`, :data:`BACKENDS`).
* :mod:`align.sampling.select` — per-step pieces: candidate scores, how many positions to commit, EOS.
* :mod:`align.sampling.forward` — the network call of a step, with the block KV caches.
* :mod:`align.sampling.reference` — LLaDA's released sampler, kept as the reference of exact mode.
* :mod:`align.sampling.loop_guard` — the decode-time loop guard (an ``on_commit`` hook).
"""

from align.sampling.loop_guard import LoopGuard, LoopGuardConfig, LoopGuardConfigError
from align.sampling.sampler import (
    BACKENDS,
    CACHE_MODES,
    EOS_POLICIES,
    REMASKING,
    GenerationOutput,
    Remask,
    SamplerState,
    SamplingConfigError,
    generate,
)
from align.sampling.select import NonFiniteLogitsError, completion_lengths

__all__ = [
    "BACKENDS",
    "CACHE_MODES",
    "EOS_POLICIES",
    "REMASKING",
    "GenerationOutput",
    "LoopGuard",
    "LoopGuardConfig",
    "LoopGuardConfigError",
    "NonFiniteLogitsError",
    "Remask",
    "SamplerState",
    "SamplingConfigError",
    "completion_lengths",
    "generate",
]
