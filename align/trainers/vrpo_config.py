"""Options of the VRPO stage: DPO-family preference optimization on ELBO estimates (names follow TRL's
``DPOConfig`` where the meaning is the same).

:class:`VRPOOptions` checks its own fields when it is built; the choice lists are imported from the modules that
own them (ELBO samplers from :mod:`align.likelihood`, losses from :mod:`align.trainers.vrpo_math`, bad-pair
policies and rejected kinds from :mod:`align.data.preference`).
"""

from __future__ import annotations

from dataclasses import dataclass

from align.data.preference import BAD_PAIR_POLICIES, REJECTED_KINDS
from align.likelihood import SAMPLERS, check_estimator_args
from align.options import FieldError, check_choice, check_range
from align.trainers.sft_config import check_max_nonfinite_steps
from align.trainers.vrpo_math import ALL_LOSS_TYPES, SMOOTHED_LOSSES

#: where the reference estimates come from: a model held during training, or a pass before it.
REFERENCES = ("model", "precomputed")


def _check_budget(key: str, value: int, sampler: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError(key, f"must be an integer >= 1, got {value!r}")
    try:
        check_estimator_args("elbo", {"sampler": sampler, "num_samples": value})
    except ValueError as exc:
        raise FieldError(key, f"does not suit 'sampler' {sampler}: {exc}", ("sampler",)) from exc


@dataclass
class VRPOOptions:
    """Options of the ``vrpo`` stage (``docs/concepts.md`` §4, ``docs/preference.md``).

    Batch size: ``per_device_train_batch_size`` (a TrainingArguments field in the same section) counts preference
    pairs; each pair is two sequences, each scored on ``num_samples`` masked views under the policy (with
    gradients) and under the reference.

    Attributes:
        beta: ``β`` of the loss (the inverse temperature of DPO, ``τ`` of IPO).
        loss_type: ``sigmoid`` (DPO), ``robust`` (robust DPO), ``ipo`` (length-normalised, as TRL), ``hinge``, or a
            list of losses to add up, as in TRL: ``sft`` is the negative ELBO per chosen token, so ``[sigmoid, sft]``
            is RPO (DPO plus likelihood on the chosen responses).
        loss_weights: one weight per entry of ``loss_type`` (default: 1 each).
        label_smoothing: ``ε``, the assumed share of flipped preference labels (conservative DPO with ``sigmoid``,
            the unbiased correction with ``robust``; must be 0 with the other losses).
        num_samples: the estimator budget ``n``: masked views per sequence and model. Each view has its own masking
            level and one mask (VRPO's optimal allocation).
        sampler: how the ``n`` levels are drawn: ``l_stratified`` (masked-token counts spread ``L/n`` apart around a
            random offset: stratified), ``t`` (independent ratios ``t ~ U(0, 1)``) or ``quadrature`` (fixed
            Gauss–Legendre nodes; biased, ``num_samples >= 2``).
        share_masks: score the policy and the reference on the same (t, mask) draws (VRPO's antithetic sampling);
            ``false`` draws the reference's views independently (only to measure what sharing buys).
        reference: ``model``: the model the stage starts from, held during training (the adapter disabled under
            LoRA, a frozen copy otherwise); ``precomputed``: its estimates computed in one pass over the pairs before
            training, so only the policy is held. Precomputed estimates fix each pair's draws for the whole run
            (keyed by the seed and the pair); with ``model`` every step draws afresh.
        bad_pairs: ``error`` (default) stops on rows whose chosen and rejected responses are equal or empty, listing
            each with its place; ``drop`` leaves them out and logs the same list.
        task_rejected: with the built-in task, how rejected solutions are made: ``looping``, ``wrong`` (a step off,
            carried to the answer) or ``mixed`` (either, ½ each; the default). Not allowed with data files.
        eval_pairs: held-out pairs scored before and after training (0: none): ``preference/accuracy`` is the share
            with ``B̂_θ(y_w) > B̂_θ(y_l)``, ``rewards/accuracies`` the share with a positive implicit reward margin,
            both on fixed draws. From the task's held-out split, or ``data.eval_files`` in preference format.
        eval_num_samples: the estimator budget ``n`` of that evaluation.
        max_nonfinite_steps: optimizer steps in a row with a non-finite loss or gradient that stop the run; each
            such step is skipped (:mod:`align.trainers.guards`).
    """

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    num_samples: int = 8
    sampler: str = "l_stratified"
    share_masks: bool = True
    reference: str = "model"
    bad_pairs: str = "error"
    task_rejected: str | None = None
    eval_pairs: int = 0
    eval_num_samples: int = 8
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        check_range("beta", self.beta, low=0.0, low_open=True)
        types = self.loss_types
        if not types:
            raise FieldError("loss_type", "is an empty list: name at least one loss")
        for name in types:
            check_choice("loss_type", name, ALL_LOSS_TYPES)
        if len(set(types)) != len(types):
            raise FieldError("loss_type", f"lists a loss twice: {types}")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(types):
                raise FieldError("loss_weights", f"needs one weight per loss type ({len(types)}), got "
                                                 f"{len(self.loss_weights)}", ("loss_type",))
            for w in self.loss_weights:
                check_range("loss_weights", w, low=0.0)
        check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        if self.label_smoothing and not set(types) & set(SMOOTHED_LOSSES):
            raise FieldError("label_smoothing", f"applies to 'loss_type' {' or '.join(SMOOTHED_LOSSES)} only, got "
                                                f"loss_type {self.loss_type!r}", ("loss_type",))
        check_choice("sampler", self.sampler, SAMPLERS)
        _check_budget("num_samples", self.num_samples, self.sampler)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("bad_pairs", self.bad_pairs, BAD_PAIR_POLICIES)
        if self.task_rejected is not None:
            check_choice("task_rejected", self.task_rejected, REJECTED_KINDS)
        if isinstance(self.eval_pairs, bool) or self.eval_pairs < 0:
            raise FieldError("eval_pairs", f"must be >= 0, got {self.eval_pairs!r}")
        _check_budget("eval_num_samples", self.eval_num_samples, self.sampler)
        check_max_nonfinite_steps(self.max_nonfinite_steps)

    @property
    def loss_types(self) -> list[str]:
        """``loss_type`` as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        """The weight of each loss type (1 each unless ``loss_weights`` is set)."""
        return [1.0] * len(self.loss_types) if self.loss_weights is None else [float(w) for w in self.loss_weights]
