"""Non-finite guards of the training stages: a step whose gradients are not finite is skipped on every rank.

Each trainer records the terms of its loss (:class:`LossComponents`: ``sft/nll``, ``grpo/policy``, ``grpo/kl``,
``vrpo/sigmoid``, ...) as it computes them. Just before the optimizer step, :class:`NonFiniteGuard` checks the
gradients; when any rank has a NaN or an infinity, every rank drops its gradients, so the optimizer leaves the
weights and its own state (Adam's moments and step counts) as they were. The warning names the step and the
terms that were not finite on that rank, the count goes to the logs as ``skipped_steps``, and after
``max_nonfinite_steps`` skipped steps in a row the run stops with :class:`NonFiniteLossError`.

A skipped step still counts as a step: ``global_step`` and the learning-rate schedule advance, so a run keeps
its length and its schedule. Under a float16 gradient scaler the scaler skips the step itself (and lowers its
scale); the guard then leaves the gradients to it and only counts and logs. Under DeepSpeed the engine owns the
gradients and applies its own overflow handling.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

#: key of the skipped-step count in the trainer's logs (``train/skipped_steps`` in wandb and tensorboard).
SKIPPED_STEPS_KEY = "skipped_steps"


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


class LossComponents:
    """The terms of the loss recorded during one optimizer step (all its micro-batches), checked only when the
    gradients turn out not to be finite."""

    def __init__(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {}

    def record(self, parts: dict[str, torch.Tensor | None], where: torch.Tensor | None = None) -> None:
        """Keep a detached copy of each named term (None entries are ignored).

        ``where``: a bool mask; each term is broadcast to its shape and only the positions it selects are kept
        (the positions that enter the loss).
        """
        for name, value in parts.items():
            if value is None:
                continue
            v = value.detach()
            if where is not None:
                v = v.expand_as(where)[where] if v.dim() else v
            self._parts.setdefault(name, []).append(v)

    def nonfinite(self) -> list[tuple[str, float]]:
        """``(name, first non-finite value)`` of each recorded term that has a NaN or an infinity."""
        found = []
        for name, values in self._parts.items():
            for v in values:
                bad = v[~torch.isfinite(v)] if v.is_floating_point() else v[:0]
                if bad.numel():
                    found.append((name, float(bad.reshape(-1)[0])))
                    break
        return found

    def clear(self) -> None:
        """Forget the recorded terms (done after each optimizer step)."""
        self._parts.clear()


def _any_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d float tensor: 1 when some gradient has a NaN or an infinity, 0 otherwise (one device sync later)."""
    return torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float()


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer steps whose gradients are not finite, on every rank; stop after ``max_consecutive`` in a row.

    Args:
        max_consecutive: skipped steps in a row that stop the run (``max_nonfinite_steps`` of the stage).

    Attributes:
        components: the loss terms the trainer records in the current step.
        consecutive, skipped: skipped steps in a row, and in all (since this process started).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped = 0
        self.components = LossComponents()

    def _describe(self, model: torch.nn.Module, local_bad: bool) -> str:
        parts = self.components.nonfinite()
        if parts:
            return "non-finite " + ", ".join(f"{name} ({value})" for name, value in parts)
        if not local_bad:
            return "non-finite gradient on another rank"
        name = next((n for n, p in model.named_parameters() if p.grad is not None
                     and not bool(torch.isfinite(p.grad).all())), "?")
        return f"non-finite gradient (first in {name}; the loss terms were finite)"

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                              **kw: Any) -> None:
        """Check the gradients of the step; on a NaN/inf anywhere, drop them on every rank and log why."""
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        local = _any_nonfinite(grads)
        bad = local.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item() == 0:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        step = state.global_step + 1               # the number the step gets in the logs
        what = self._describe(model, bool(local.item()))
        scaler = getattr(optimizer, "scaler", None)
        action = "left to the float16 gradient scaler" if scaler is not None else "update skipped"
        logger.warning("step %d: %s; %s (%d in a row, %d in all)", step, what, action, self.consecutive,
                       self.skipped)
        if scaler is None:
            for p in model.parameters():
                p.grad = None
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} steps in a row had a non-finite loss or gradient (last: step {step}, {what}); "
                "stopping. Lower the learning rate, check the rows of those steps, train in float32 or bfloat16 "
                "rather than float16, or raise the stage's 'max_nonfinite_steps'")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Forget the loss terms of the step just taken."""
        self.components.clear()

    def log_fields(self) -> dict[str, float]:
        """What the trainer adds to each training log: the number of skipped steps so far."""
        return {SKIPPED_STEPS_KEY: float(self.skipped)}


def install_guard(trainer: Any, max_consecutive: int) -> NonFiniteGuard:
    """Add a :class:`NonFiniteGuard` to ``trainer`` (a ``transformers.Trainer``) and return it."""
    guard = NonFiniteGuard(max_consecutive)
    trainer.add_callback(guard)
    return guard
