"""Options of the masked-diffusion training stages (``pretrain`` and ``sft``), beside their trainer.

:class:`DiffusionSFTOptions` checks its own fields when it is built; its choice lists come from the modules
that own them (normalizations from :mod:`align.masking`, ``eos_train`` from :mod:`align.data.collator`).
"""

from __future__ import annotations

from dataclasses import dataclass

from align.data.collator import CollatorError, parse_eos_train
from align.masking import NORMALIZATIONS
from align.options import FieldError, check_choice, check_range


@dataclass
class DiffusionSFTOptions:
    """Masked-diffusion options of a training stage (``docs/concepts.md`` §1).

    Attributes:
        eps: ``ε`` of ``p_mask = (1 − ε)·t + ε``.
        t_min, t_max: ``t ~ U(t_min, t_max)``.
        normalization: ``sequence`` (LLaDA), ``token`` (d1) or ``masked`` (no 1/p_mask weight).
        eos_train: trailing padding EOS tokens trained: ``all``, ``none`` or an integer k.
        random_length_prob: share of batches cut to a random length (pre-training only, LLaDA uses 0.01).
        max_nonfinite_steps: optimizer steps in a row with a non-finite loss or gradient that stop the run; each
            such step is skipped (:mod:`align.trainers.guards`).
    """

    eps: float = 1e-3
    t_min: float = 0.0
    t_max: float = 1.0
    normalization: str = "sequence"
    eos_train: str | int = "all"
    random_length_prob: float = 0.0
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise FieldError("t_min", f"and 't_max' need 0 <= t_min < t_max <= 1, got {self.t_min} and {self.t_max}",
                             ("t_max",))
        check_range("eps", self.eps, low=0.0, high=1.0, high_open=True)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        try:
            parse_eos_train(self.eos_train)
        except CollatorError as exc:
            raise FieldError("eos_train", f"must be all, none or an integer >= 0, got {self.eos_train!r}") from exc
        check_range("random_length_prob", self.random_length_prob, low=0.0, high=1.0)
        check_max_nonfinite_steps(self.max_nonfinite_steps)


def check_max_nonfinite_steps(value: int) -> None:
    """Raise :class:`FieldError` unless ``max_nonfinite_steps`` is an integer >= 1 (every stage has the field)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError("max_nonfinite_steps", f"must be an integer >= 1 (skipped steps in a row that stop the run), "
                                                f"got {value!r}")
