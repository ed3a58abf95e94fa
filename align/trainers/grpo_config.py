"""Options of the diffusion GRPO stage (names follow TRL's ``GRPOConfig`` where the meaning is the same).

:class:`GRPOOptions` checks its own fields when it is built; the choice lists are imported from the modules
that own them (estimators from :mod:`align.likelihood`, sampler settings from :mod:`align.sampling`, losses,
objectives and advantages from :mod:`align.trainers.grpo_math`, failure policies from :mod:`align.rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.likelihood import ESTIMATORS, check_estimator_args
from align.options import FieldError, check_choice, check_range
from align.rewards import RewardSpecError, check_reward_specs, check_runner_settings
from align.sampling.settings import SamplerSettings
from align.trainers.grpo_math import (
    ALL_LOSS_TYPES,
    BASELINES,
    LOSS_ARG_RANGES,
    LOSS_ARGS,
    OBJECTIVE_ESTIMATORS,
    RATIO_FREE,
    SCALE_REWARDS,
)
from align.trainers.sft_config import check_max_nonfinite_steps

#: importance-sampling ratio per token or per sequence.
IS_LEVELS = ("token", "sequence")


@dataclass
class GRPOOptions(SamplerSettings):
    """Diffusion policy-optimization options of the ``grpo`` stage (``docs/concepts.md`` §3).

    Batch size: ``per_device_train_batch_size`` (a TrainingArguments field in the same section) counts
    *completions*, as in TRL, and must be a multiple of ``num_generations``; each device draws
    ``per_device_train_batch_size / num_generations`` prompts per micro-batch and samples ``num_generations``
    completions for each. The trainer logs the effective numbers when it starts.

    Attributes:
        gen_length, denoising_steps, block_length, temperature, remasking, threshold, cache, cfg_scale,
            loop_guard: rollout sampler settings (:class:`align.sampling.settings.SamplerSettings`; the
            rollouts sample at ``temperature`` 1 by default).
        num_generations: completions ``G`` sampled per prompt.
        estimator: ``one_step`` (diffu-GRPO), ``coupled`` (coupled-GRPO), ``elbo`` (ELBO-GRPO), ``trace``
            (TraceRL: each token scored in the context its rollout decoded it in) or ``block`` (SPG's block-wise
            masks: a random block partly masked, earlier blocks clean, later ones fully masked).
        estimator_args: keyword arguments of the estimator's mask draw (``p_mask_prompt``; ``t_min``/``t_max``;
            ``num_samples`` Monte Carlo draws, ``sampler``, ``n_nodes``; ``num_views``; for ``block``:
            ``block_length`` (default: this section's ``block_length``), ``num_samples``, ``t_min``, ``t_max``,
            ``p_mask_prompt``, ``weighting``).
        importance_sampling_level: ``token`` or ``sequence`` ratio; default ``token`` for one_step/coupled/trace
            and ``sequence`` for elbo and block, and always ``sequence`` with ``loss_type: espo``; rejected with
            the ratio-free ``spg`` and ``wd1``.
        num_iterations: ``μ`` gradient steps per batch of rollouts; each uses its own mask draw, shared by the
            old, reference and current policy. As in TRL, the data loader yields each optimizer step's prompts
            ``μ`` times in a row, and rollouts are sampled on the first of them, so every prompt is used.
        epsilon, epsilon_high: clip range ``[1 − ε, 1 + ε_high]`` (``ε_high`` defaults to ``ε``). With
            ``loss_type: cispo``, ``epsilon_high`` is the cap on the ratio (required; ScaleRL uses 5.0).
        beta: weight of the k3 KL to the reference (adapter disabled under LoRA, else a frozen copy).
        loss_type: TRL's names (``docs/concepts.md`` §3.4): ``grpo`` (per-sequence mean, then batch mean; the
            default here, TRL's is ``dapo``), ``bnpo`` (token mean of the micro-batch), ``dr_grpo`` (sum divided
            by completions × gen_length), ``dapo`` (token mean of the whole optimizer step), ``cispo`` (capped,
            gradient-free ratio times the log-likelihood; dapo's normalisation), ``sapo`` (soft gate instead of
            clipping; grpo's normalisation), ``luspo`` (each completion's token sum, mean over completions) or
            ``vespo`` (gradient-free Gamma weight of the sequence ratio times the log-likelihood; dapo's
            normalisation); or one of the diffusion-LM objectives (``docs/grpo.md``, "Objectives"): ``spg``
            (Sandwiched Policy Gradient: ELBO for positive advantages, an EUBO/ELBO mixture for the others;
            estimator ``block`` or ``elbo``), ``wd1`` (ratio-free advantage-weighted likelihood) or ``espo``
            (clipped ELBO ratio normalised per token, k2 KL; estimator ``elbo``, ``coupled`` or ``block``).
            ``spg`` and ``wd1`` have no KL term (``beta`` must be 0).
        sapo_temperature_pos, sapo_temperature_neg: temperatures of the ``sapo`` gate for positive and other
            advantages (TRL's defaults 1.0 and 1.05); only with ``loss_type: sapo``.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: exponent ``k`` and decay ``λ`` of the
            ``vespo`` weight for non-negative and negative advantages (TRL's defaults 2, 3, 3, 2); only with
            ``loss_type: vespo``.
        spg_beta, spg_omega: ``β`` of SPG's upper bound (>= 1; 1.5, the paper's) and ``ω``, the weight of the upper
            bound in the value pushed down for non-positive advantages (in [0, 1]; 0.5, the paper's mixture; 1 is
            the pure upper bound, 0 the ELBO); only with ``loss_type: spg``.
        wd1_psi: ``ψ``, the inverse temperature of wd1's softmax weights over each group's advantages (> 0; 1.0,
            the authors' code); only with ``loss_type: wd1``.
        scale_rewards: divide advantages by the ``group`` std, the ``batch`` std, or ``none``.
        baseline: ``mean`` (group mean) or ``leave_one_out`` (mean of the other completions of the group).
        negative_advantage_scale: multiplies negative advantages (``A_i ← c·A_i`` where ``A_i < 0``); ``1`` is
            GRPO, ``0`` keeps only the push towards better-than-average completions. Lowering it guards small
            models against likelihood displacement: a wrong completion shares most tokens with the right ones, and
            pushing it down also pulls the right ones down.
        mask_truncated_completions: exclude completions with no stop token from the loss.
        eos_fill_in_loss: count the EOS fill after the first stop in the likelihood (default). The sampler
            generates every one of the ``gen_length`` positions, the fill included; leaving the fill out (scoring
            up to the first stop only, as for autoregressive models) shows it unmasked to the model and never
            trains end-of-sequence predictions at masked positions, and completions then grow until they hit
            the budget.
        rewards: reward specs: ``{name: ..., weight: ..., <kwargs>}`` (see :mod:`align.rewards`). Names and
            arguments are checked when the options are built; reward models are loaded only by the trainer.
        reward_failure: keyword arguments of :class:`align.rewards.RewardRunner`: ``on_error`` (skip / zero /
            abort), ``timeout_s``, ``isolation`` (none / thread / process), ``max_error_rate``, ``min_samples``,
            ``count_none_as_error``. A reward entry may override ``on_error`` / ``timeout_s`` for itself.
        hint_column: IGPO-style hints (:mod:`align.trainers.hints`): the data column holding a reference solution
            (e.g. ``completion``); when set, a group whose completions are all wrong is sampled again with chunks of
            that solution fixed in place, and its correct hinted completions replace some of the wrong ones. Off
            (None) by default.
        hint_reward: the reward function that says right (``> 0``) or wrong; default the first of ``rewards``.
        hint_ratio: ``[low, high]``: the share of the reference's tokens fixed is drawn uniformly from it.
        hint_replace: share of a group's completions that correct hinted ones may replace (at least one).
        log_completions: completions written to ``completions.jsonl`` (and loggers) per logging step.
        max_nonfinite_steps: optimizer steps in a row with a non-finite loss or gradient that stop the run; each
            such step is skipped (:mod:`align.trainers.guards`).
    """

    temperature: float = 1.0
    num_generations: int = 8
    estimator: str = "one_step"
    estimator_args: dict[str, Any] = field(default_factory=dict)
    importance_sampling_level: str | None = None
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    loss_type: str = "grpo"
    sapo_temperature_pos: float | None = None
    sapo_temperature_neg: float | None = None
    vespo_k_pos: float | None = None
    vespo_lambda_pos: float | None = None
    vespo_k_neg: float | None = None
    vespo_lambda_neg: float | None = None
    spg_beta: float | None = None
    spg_omega: float | None = None
    wd1_psi: float | None = None
    scale_rewards: str = "group"
    baseline: str = "mean"
    negative_advantage_scale: float = 1.0
    mask_truncated_completions: bool = False
    eos_fill_in_loss: bool = True
    rewards: list[dict[str, Any] | str] = field(default_factory=lambda: [{"name": "task_accuracy"}])
    reward_failure: dict[str, Any] = field(default_factory=dict)
    hint_column: str | None = None
    hint_reward: str | None = None
    hint_ratio: list[float] = field(default_factory=lambda: [0.2, 0.6])
    hint_replace: float = 0.5
    log_completions: int = 4
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise FieldError("num_generations", f"must be >= 2 (group advantages need a group), "
                                                f"got {self.num_generations}")
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.estimator == "block" and "block_length" not in self.estimator_args:
            # the blocks of the masks are the rollout's blocks unless set otherwise
            self.estimator_args = {**self.estimator_args, "block_length": self.block_length}
        try:
            check_estimator_args(self.estimator, self.estimator_args)
        except ValueError as exc:
            raise FieldError("estimator_args", f"is invalid: {exc}") from exc
        if self.importance_sampling_level is not None:
            check_choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        if self.num_iterations < 1:
            raise FieldError("num_iterations", f"must be >= 1, got {self.num_iterations}")
        check_range("epsilon", self.epsilon, low=0.0, low_open=True)
        if self.epsilon_high is not None:
            check_range("epsilon_high", self.epsilon_high, low=0.0, low_open=True)
        check_range("beta", self.beta, low=0.0)
        check_choice("loss_type", self.loss_type, ALL_LOSS_TYPES)
        for key, (owner, _) in LOSS_ARGS.items():
            value = getattr(self, key)
            if value is None:
                continue
            if self.loss_type != owner:
                raise FieldError(key, f"only applies with 'loss_type' {owner}, got loss_type {self.loss_type!r}",
                                 ("loss_type",))
            # temperatures and decays must be positive; VESPO's exponents k may be 0; SPG's β >= 1, ω in [0, 1]
            check_range(key, value, **LOSS_ARG_RANGES.get(key, {"low": 0.0, "low_open": True}))
        self._check_objective()
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise FieldError("epsilon_high", "is required with 'loss_type' cispo: it caps the importance ratio "
                                             "(ScaleRL uses 5.0)", ("loss_type",))
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice("baseline", self.baseline, BASELINES)
        check_range("negative_advantage_scale", self.negative_advantage_scale, low=0.0, high=1.0)
        if not self.rewards:
            raise FieldError("rewards", "must name at least one reward function")
        try:
            check_reward_specs(self.rewards)
        except RewardSpecError as exc:
            raise FieldError("rewards", f"is invalid: {exc}") from exc
        try:
            check_runner_settings(**self.reward_failure)
        except (TypeError, ValueError) as exc:
            raise FieldError("reward_failure", f"is invalid: {exc}") from exc
        ratio = self.hint_ratio
        if not (isinstance(ratio, (list, tuple)) and len(ratio) == 2 and all(isinstance(x, (int, float)) for x in ratio)
                and 0 < ratio[0] <= ratio[1] <= 1):
            raise FieldError("hint_ratio", f"must be [low, high] with 0 < low <= high <= 1, got {ratio!r}")
        check_range("hint_replace", self.hint_replace, low=0.0, high=1.0, low_open=True)
        for key in ("hint_reward",):
            if getattr(self, key) is not None and self.hint_column is None:
                raise FieldError(key, "only applies with 'hint_column' (the reference solutions hints come from)",
                                 ("hint_column",))
        if self.log_completions < 0:
            raise FieldError("log_completions", f"must be >= 0, got {self.log_completions}")
        check_max_nonfinite_steps(self.max_nonfinite_steps)

    def _check_objective(self) -> None:
        """The estimator, ratio level and KL term each diffusion-LM objective is defined for."""
        lt = self.loss_type
        allowed = OBJECTIVE_ESTIMATORS.get(lt)
        if allowed is not None and self.estimator not in allowed:
            why = ("its upper bound needs sampled-ratio rows (coef = 1/(n·t))" if lt == "spg"
                   else "its ratio is one of sequence-level ELBOs")
            raise FieldError("estimator", f"must be one of {', '.join(allowed)} with 'loss_type' {lt} ({why}), "
                                          f"got {self.estimator!r}", ("loss_type",))
        if lt in RATIO_FREE and self.importance_sampling_level is not None:
            raise FieldError("importance_sampling_level", f"does not apply with 'loss_type' {lt}: the objective has "
                                                          "no importance ratio", ("loss_type",))
        if lt == "espo" and self.importance_sampling_level == "token":
            raise FieldError("importance_sampling_level", "must be sequence with 'loss_type' espo (its ratio is one "
                                                          "of sequence-level ELBOs)", ("loss_type",))
        if lt in RATIO_FREE and self.beta > 0:
            raise FieldError("beta", f"must be 0 with 'loss_type' {lt}: the objective has no KL term, got "
                                     f"{self.beta:g}", ("loss_type",))

    @property
    def loss_args(self) -> dict[str, float]:
        """The hyper-parameters of ``loss_type`` (TRL's or the paper's defaults for unset ones), for
        :func:`~align.trainers.grpo_math.policy_objective` and :mod:`align.trainers.objectives`."""
        return {key: default if getattr(self, key) is None else getattr(self, key)
                for key, (owner, default) in LOSS_ARGS.items() if owner == self.loss_type}

    @property
    def is_level(self) -> str:
        """The importance-sampling level in effect."""
        if self.importance_sampling_level is not None:
            return self.importance_sampling_level
        return "sequence" if self.estimator in ("elbo", "block") or self.loss_type == "espo" else "token"

    def prompts_per_device(self, per_device_train_batch_size: int) -> int:
        """Prompts each device draws per micro-batch: ``per_device_train_batch_size / num_generations``."""
        return per_device_train_batch_size // self.num_generations
