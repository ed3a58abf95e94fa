"""Sequence-likelihood estimators for masked diffusion models (``docs/concepts.md`` §2).

Three modules, one job each:

* :mod:`align.likelihood.masks` — mask plans: every random choice of an estimator (which views of a
  sequence are built, which positions are masked, with which coefficient), drawn from explicit generators;
  :mod:`align.likelihood.blocks` adds SPG's block-wise plans (``estimator: block``).
* :mod:`align.likelihood.scoring` — :func:`score_plan` scores a plan under a model, and the estimator
  entry points :func:`one_step`, :func:`coupled`, :func:`elbo` and :func:`trace` that draw and score.
* :mod:`align.likelihood.exact` — the exact ELBO by enumeration (tiny lengths; the ground truth of tests
  and benchmarks).
"""

from align.likelihood.blocks import BLOCK_WEIGHTINGS, draw_block_masks
from align.likelihood.exact import exact_elbo, exact_masked_sums
from align.likelihood.masks import (
    ESTIMATORS,
    SAMPLERS,
    EmptyResponseError,
    InvalidSettingError,
    LikelihoodError,
    MaskPlan,
    ShapeMismatchError,
    UnknownEstimatorError,
    check_estimator_args,
    draw_coupled_masks,
    draw_elbo_masks,
    draw_masks,
    draw_one_step_masks,
    draw_trace_masks,
    join_prompt_completion,
)
from align.likelihood.scoring import LikelihoodEstimate, coupled, elbo, one_step, score_plan, trace

__all__ = [
    "BLOCK_WEIGHTINGS",
    "ESTIMATORS",
    "SAMPLERS",
    "EmptyResponseError",
    "InvalidSettingError",
    "LikelihoodError",
    "LikelihoodEstimate",
    "MaskPlan",
    "ShapeMismatchError",
    "UnknownEstimatorError",
    "check_estimator_args",
    "coupled",
    "draw_block_masks",
    "draw_coupled_masks",
    "draw_elbo_masks",
    "draw_masks",
    "draw_one_step_masks",
    "draw_trace_masks",
    "elbo",
    "exact_elbo",
    "exact_masked_sums",
    "join_prompt_completion",
    "one_step",
    "score_plan",
    "trace",
]
