"""Options of the diffusion GRPO stage (names follow TRL's ``GRPOConfig`` where the meaning is the same)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ESTIMATOR_CHOICES = ("one_step", "coupled", "elbo", "trace")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")
IS_LEVELS = ("token", "sequence")


@dataclass
class GRPOOptions:
    """Diffusion policy-optimization options of the ``grpo`` stage.

    ``per_device_train_batch_size`` (a TrainingArguments field in the same section) counts completions, as
    in TRL, and must be a multiple of ``num_generations``.

    Attributes:
        num_generations: completions ``G`` sampled per prompt.
        max_completion_length: generated tokens per completion (the sampler's ``gen_length``).
        steps, block_length, temperature, remasking, threshold, cache, cfg_scale: rollout sampler settings
            (:func:`align.sampling.generate`).
        loop_guard: decode-time loop guard of the rollouts (:class:`align.sampling.loop_guard.LoopGuardConfig`).
        estimator: ``one_step`` (diffu-GRPO), ``coupled`` (coupled-GRPO), ``elbo`` (ELBO-GRPO) or ``trace``
            (TraceRL: each token scored in the context its rollout decoded it in).
        estimator_args: keyword arguments of the estimator's mask draw (``p_mask_prompt``; ``t_min``/``t_max``;
            ``num_samples``, ``sampler``, ``n_nodes``; ``num_views``).
        importance_sampling_level: ``token`` or ``sequence`` ratio; default ``token`` for one_step/coupled and
            ``sequence`` for elbo.
        num_iterations: ``μ`` gradient steps per batch of rollouts; each uses its own mask draw, shared by the
            old, reference and current policy. A new batch of prompts is drawn every ``μ`` steps.
        epsilon, epsilon_high: clip range ``[1 − ε, 1 + ε_high]`` (``ε_high`` defaults to ``ε``).
        beta: weight of the k3 KL to the reference (adapter disabled under LoRA, else a frozen copy).
        loss_type: ``grpo`` (per-sequence mean, then batch mean), ``bnpo`` (global token mean) or ``dr_grpo``
            (sum divided by completions × max_completion_length).
        scale_rewards: divide advantages by the ``group`` std, the ``batch`` std, or ``none``.
        baseline: ``mean`` (group mean) or ``leave_one_out`` (mean of the other completions of the group).
        negative_advantage_scale: multiplies negative advantages (``A_i ← c·A_i`` where ``A_i < 0``); ``1`` is
            GRPO, ``0`` keeps only the push towards better-than-average completions. Lowering it guards small
            models against likelihood displacement: a wrong completion shares most tokens with the right ones, and
            pushing it down also pulls the right ones down.
        mask_truncated_completions: exclude completions with no stop token from the loss.
        eos_fill_in_loss: count the EOS fill after the first stop in the likelihood (default). The sampler
            generates every one of the ``max_completion_length`` positions, the fill included; leaving the fill
            out (scoring up to the first stop only, as for autoregressive models) shows it unmasked to the
            model and never trains end-of-sequence predictions at masked positions, and completions then grow
            until they hit the budget.
        rewards: reward specs: ``{name: ..., weight: ..., <kwargs>}`` (see :mod:`align.rewards`).
        reward_failure: keyword arguments of :class:`align.rewards.RewardRunner`: ``on_error`` (skip / zero /
            abort), ``timeout_s``, ``isolation`` (none / thread / process), ``max_error_rate``, ``min_samples``,
            ``count_none_as_error``. A reward entry may override ``on_error`` / ``timeout_s`` for itself.
        log_completions: completions written to ``completions.jsonl`` (and loggers) per logging step.
    """

    num_generations: int = 8
    max_completion_length: int = 32
    steps: int = 32
    block_length: int = 32
    temperature: float = 1.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0
    loop_guard: dict[str, Any] = field(default_factory=dict)
    estimator: str = "one_step"
    estimator_args: dict[str, Any] = field(default_factory=dict)
    importance_sampling_level: str | None = None
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    baseline: str = "mean"
    negative_advantage_scale: float = 1.0
    mask_truncated_completions: bool = False
    eos_fill_in_loss: bool = True
    rewards: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "task_accuracy"}])
    reward_failure: dict[str, Any] = field(default_factory=dict)
    log_completions: int = 4

    @property
    def is_level(self) -> str:
        """The importance-sampling level in effect."""
        if self.importance_sampling_level is not None:
            return self.importance_sampling_level
        return "sequence" if self.estimator == "elbo" else "token"


def check_sampler_settings(where: str, *, gen_length: int, steps: int, block_length: int, temperature: float,
                           remasking: str, threshold: float | None, cache: str | None,
                           gen_length_key: str = "gen_length") -> list[str]:
    """Problems with rollout-sampler settings (shared by ``eval`` and ``grpo``), each naming its key."""
    errs: list[str] = []
    if gen_length < 1 or block_length < 1 or gen_length % block_length:
        errs.append(f"'{where}.{gen_length_key}' ({gen_length}) must be a positive multiple of "
                    f"'{where}.block_length' ({block_length})")
    else:
        n_blocks = gen_length // block_length
        if steps < n_blocks or steps % n_blocks:
            errs.append(f"'{where}.steps' ({steps}) must be a positive multiple of the number of blocks "
                        f"({n_blocks} = {gen_length_key} / block_length)")
    if temperature < 0:
        errs.append(f"'{where}.temperature' must be >= 0, got {temperature}")
    if remasking not in ("low_confidence", "random", "margin", "entropy"):
        errs.append(f"'{where}.remasking' must be low_confidence, random, margin or entropy, got {remasking!r}")
    if cache not in (None, "prefix", "dual"):
        errs.append(f"'{where}.cache' must be null, prefix or dual, got {cache!r}")
    if threshold is not None and not 0 < threshold <= 1:
        errs.append(f"'{where}.threshold' must be in (0, 1], got {threshold}")
    return errs


def check_grpo_options(o: GRPOOptions, ta_kwargs: dict[str, Any], where: str = "grpo") -> list[str]:
    """Problems with a GRPO section, each naming its key (empty when valid)."""
    errs: list[str] = []

    def bad(key: str, msg: str) -> None:
        errs.append(f"'{where}.{key}' {msg}")

    if o.num_generations < 2:
        bad("num_generations", f"must be >= 2 (group advantages need a group), got {o.num_generations}")
    bs = ta_kwargs.get("per_device_train_batch_size", 8)
    if isinstance(bs, int) and o.num_generations >= 1 and bs % o.num_generations:
        bad("per_device_train_batch_size", f"({bs}) must be a multiple of num_generations ({o.num_generations})")
    errs += check_sampler_settings(where, gen_length=o.max_completion_length, steps=o.steps,
                                   block_length=o.block_length, temperature=o.temperature, remasking=o.remasking,
                                   threshold=o.threshold, cache=o.cache, gen_length_key="max_completion_length")
    if o.estimator not in ESTIMATOR_CHOICES:
        bad("estimator", f"must be one of {', '.join(ESTIMATOR_CHOICES)}, got {o.estimator!r}")
    if o.importance_sampling_level not in (None, *IS_LEVELS):
        bad("importance_sampling_level", f"must be token or sequence, got {o.importance_sampling_level!r}")
    if o.num_iterations < 1:
        bad("num_iterations", f"must be >= 1, got {o.num_iterations}")
    if o.epsilon <= 0 or (o.epsilon_high is not None and o.epsilon_high <= 0):
        bad("epsilon", "and epsilon_high must be > 0")
    if o.beta < 0:
        bad("beta", f"must be >= 0, got {o.beta}")
    if o.loss_type not in LOSS_TYPES:
        bad("loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {o.loss_type!r}")
    if o.scale_rewards not in SCALE_REWARDS:
        bad("scale_rewards", f"must be one of {', '.join(SCALE_REWARDS)}, got {o.scale_rewards!r}")
    if o.baseline not in BASELINES:
        bad("baseline", f"must be mean or leave_one_out, got {o.baseline!r}")
    if not 0.0 <= o.negative_advantage_scale <= 1.0:
        bad("negative_advantage_scale", f"must be in [0, 1], got {o.negative_advantage_scale}")
    if not o.rewards:
        bad("rewards", "must name at least one reward function")
    if o.log_completions < 0:
        bad("log_completions", "must be >= 0")
    return errs
