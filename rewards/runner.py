"""Calling reward functions on a batch, with failure isolation.

:class:`RewardRunner` calls each reward function with TRL's convention
(``f(prompts=..., completions=..., completion_ids=..., **columns)``) and returns the per-function
rewards ``R`` [N, F] and the weighted total ``r_i = Σ_f w_f R_if`` [N] (a NaN entry is left out of
the sum, as in TRL; a row where every function gave NaN stays NaN, so GRPO can drop it from the
group statistics).

Failures, counted per function and applied per the function's ``on_error`` policy:

- the call raises (``errors``) or runs past ``timeout_s`` (``timeouts``): every sample of the batch fails;
- it returns something that is not a list of N values (``bad_length``): every sample fails;
- a value is ``None`` (``nones``) or not a finite number (``nans``): that sample fails.

Policies: ``skip`` — the failed sample's reward for that function is NaN and it is excluded from the
weighted sum and so from the advantage (TRL's ``None`` handling); ``zero`` — it is 0.0; ``abort`` —
raise :class:`RewardFunctionError` at once. Independently, once a function has seen
``min_samples`` samples, the run aborts with :class:`RewardAbortError` when the share of its
samples that failed exceeds ``max_error_rate`` (``None`` values count only with
``count_none_as_error``: TRL rewards return ``None`` on purpose for rows they do not apply to).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ._workers import ISOLATIONS, ProcessCaller, RewardTimeoutError, ThreadCaller, make_caller
from .registry import POLICIES, RewardFunction, parse_reward_spec, resolve_reward, reward_name

__all__ = [
    "RewardAbortError",
    "RewardFunctionError",
    "RewardOutput",
    "RewardRunner",
    "RewardStats",
    "check_runner_settings",
]

logger = logging.getLogger(__name__)
Policy = Literal["skip", "zero", "abort"]


class RewardFunctionError(RuntimeError):
    """A reward function failed and its policy is ``abort``."""


class RewardAbortError(RuntimeError):
    """A reward function's error rate over the run passed ``max_error_rate``."""

    def __init__(self, message: str, name: str, rate: float) -> None:
        super().__init__(message)
        self.name = name
        self.rate = rate


@dataclass
class RewardStats:
    """Failure counts of one reward function over the run."""

    calls: int = 0
    samples: int = 0
    errors: int = 0
    timeouts: int = 0
    bad_length: int = 0
    nones: int = 0
    nans: int = 0
    failed_samples: int = 0

    @property
    def error_rate(self) -> float:
        """Share of this function's samples that failed (the abort criterion)."""
        return self.failed_samples / self.samples if self.samples else 0.0


@dataclass(frozen=True)
class RewardOutput:
    """Rewards of one batch: ``per_function`` [N, F], ``total`` [N], with ``names`` and ``weights`` [F]."""

    per_function: torch.Tensor
    total: torch.Tensor
    names: tuple[str, ...]
    weights: torch.Tensor


def _per_function(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} reward functions")
    return list(value)


class RewardRunner:
    """Score batches with several reward functions, isolating failures (module docstring).

    Args:
        funcs: reward callables (TRL signature).
        weights: one weight per function (default 1.0 each).
        names: log names (default: each function's ``__name__``; duplicates get ``_2``, ``_3``...).
        on_error: ``"skip"``, ``"zero"`` or ``"abort"``, for all functions or one per function.
        timeout_s: seconds per call (None: no limit), for all functions or one per function.
        isolation: ``"none"``, ``"thread"`` or ``"process"``; default ``"thread"`` when any timeout
            is set, else ``"none"``.
        max_error_rate: abort threshold on a function's failed-sample share; None disables.
        min_samples: samples a function must have seen before the abort threshold applies.
        count_none_as_error: count ``None`` values towards the error rate.
        mp_context: multiprocessing start method for ``isolation="process"`` (None: platform default).
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunction],
        weights: Sequence[float] | None = None,
        *,
        names: Sequence[str] | None = None,
        on_error: Policy | Sequence[Policy] = "skip",
        timeout_s: float | Sequence[float | None] | None = None,
        isolation: Literal["none", "thread", "process"] | None = None,
        max_error_rate: float | None = 0.5,
        min_samples: int = 256,
        count_none_as_error: bool = False,
        mp_context: str | None = None,
    ) -> None:
        F = len(funcs)
        if F == 0:
            raise ValueError("RewardRunner needs at least one reward function")
        weights = [1.0] * F if weights is None else [float(w) for w in weights]
        if len(weights) != F:
            raise ValueError(f"{len(weights)} weights for {F} reward functions")
        self.on_error: list[str] = _per_function(on_error, F, "on_error")
        self.timeout_s: list[float | None] = _per_function(timeout_s, F, "timeout_s")
        isolation = _check_settings(self.on_error, self.timeout_s, isolation, max_error_rate, min_samples)
        raw = list(names) if names is not None else [reward_name(f) for f in funcs]
        if len(raw) != F:
            raise ValueError(f"{len(raw)} names for {F} reward functions")
        self.names = _dedupe(raw)
        self.funcs = list(funcs)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.isolation = isolation
        self.max_error_rate = max_error_rate
        self.min_samples = min_samples
        self.count_none_as_error = count_none_as_error
        self._callers = [make_caller(f, isolation, mp_context) for f in self.funcs]
        self.stats = {name: RewardStats() for name in self.names}

    @classmethod
    def from_specs(cls, specs: Sequence[Mapping[str, Any] | str], **kwargs: Any) -> RewardRunner:
        """Build from recipe entries; an entry's ``on_error`` / ``timeout_s`` override the defaults in ``kwargs``."""
        parsed = [parse_reward_spec(s) for s in specs]
        funcs = [resolve_reward(s.name, **s.kwargs) for s in parsed]
        on_error = kwargs.pop("on_error", "skip")
        timeout = kwargs.pop("timeout_s", None)
        return cls(
            funcs,
            [s.weight for s in parsed],
            on_error=[s.on_error or on_error for s in parsed],
            timeout_s=[s.timeout_s if s.timeout_s is not None else timeout for s in parsed],
            **kwargs,
        )

    def __call__(
        self,
        prompts: Sequence[Any] | None,
        completions: Sequence[Any],
        completion_ids: Any = None,
        **columns: Any,
    ) -> RewardOutput:
        """Score one batch; see the module docstring for the failure handling."""
        N = len(completions)
        if prompts is not None and len(prompts) != N:
            raise ValueError(f"{len(prompts)} prompts for {N} completions")
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        cols = [self._score(i, kwargs, N) for i in range(len(self.funcs))]
        R = torch.tensor(cols, dtype=torch.float32).T.reshape(N, len(self.funcs))
        weighted = R * self.weights.unsqueeze(0)
        total = torch.nansum(weighted, dim=1)  # r_i = Σ_f w_f R_if over the non-NaN entries
        total[torch.isnan(R).all(dim=1)] = torch.nan
        return RewardOutput(R, total, tuple(self.names), self.weights.clone())

    def _score(self, i: int, kwargs: dict[str, Any], N: int) -> list[float]:
        name, st, policy = self.names[i], self.stats[self.names[i]], self.on_error[i]
        st.calls += 1
        st.samples += N
        fill = math.nan if policy != "zero" else 0.0
        failure = None
        try:
            out = self._callers[i].call(kwargs, self.timeout_s[i])
        except RewardTimeoutError:
            st.timeouts += 1
            failure = f"timed out after {self.timeout_s[i]} s"
        except Exception as e:
            st.errors += 1
            failure = f"raised {type(e).__name__}: {e}"
        if failure is None:
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().reshape(-1).tolist()
            elif hasattr(out, "tolist") and not isinstance(out, list | tuple):
                out = out.tolist()
            if not isinstance(out, list | tuple) or len(out) != N:
                st.bad_length += 1
                got = f"{len(out)} values" if isinstance(out, list | tuple) else type(out).__name__
                failure = f"returned {got} for {N} completions"
        if failure is not None:
            st.failed_samples += N
            logger.warning("reward %r %s (on_error=%r)", name, failure, policy)
            if policy == "abort":
                raise RewardFunctionError(f"reward function {name!r} {failure} (on_error='abort')")
            self._check_rate(name, st)
            return [fill] * N
        values: list[float] = []
        for v in out:
            if v is None:
                st.nones += 1
                bad = "None"
                st.failed_samples += int(self.count_none_as_error)
            else:
                try:
                    f = float(v)
                except (TypeError, ValueError):
                    f = math.nan
                if math.isfinite(f):
                    values.append(f)
                    continue
                st.nans += 1
                st.failed_samples += 1
                bad = repr(v)
            if policy == "abort":
                raise RewardFunctionError(f"reward function {name!r} returned {bad} (on_error='abort')")
            values.append(fill)
        self._check_rate(name, st)
        return values

    def _check_rate(self, name: str, st: RewardStats) -> None:
        if self.max_error_rate is None or st.samples < self.min_samples:
            return
        if st.error_rate > self.max_error_rate:
            raise RewardAbortError(
                f"reward function {name!r} failed on {st.error_rate:.1%} of {st.samples} samples "
                f"(max_error_rate={self.max_error_rate:.1%}): {st.errors} errors, {st.timeouts} timeouts, "
                f"{st.bad_length} bad-length results, {st.nans} NaN/invalid values, {st.nones} None",
                name,
                st.error_rate,
            )

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Cumulative failure counts per function (``{prefix}{name}/{count}``) and stuck calls, for logging."""
        out: dict[str, float] = {}
        for name, st in self.stats.items():
            for key, value in asdict(st).items():
                out[f"{prefix}{name}/{key}"] = float(value)
            out[f"{prefix}{name}/error_rate"] = st.error_rate
        out[f"{prefix}stuck_calls"] = float(sum(c.stuck for c in self._callers if isinstance(c, ThreadCaller)))
        out[f"{prefix}worker_restarts"] = float(sum(c.restarts for c in self._callers if isinstance(c, ProcessCaller)))
        return out

    def close(self) -> None:
        """Stop worker processes."""
        for c in self._callers:
            c.close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_settings(on_error: list[str], timeout_s: list[float | None], isolation: str | None,
                    max_error_rate: float | None, min_samples: int) -> str:
    """Validate the failure settings; return the isolation mode in effect (``None`` picks one)."""
    for p in on_error:
        if p not in POLICIES:
            raise ValueError(f"on_error must be one of {POLICIES}, got {p!r}")
    if any(t is not None and t <= 0 for t in timeout_s):
        raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
    if isolation is None:
        isolation = "thread" if any(t is not None for t in timeout_s) else "none"
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "none" and any(t is not None for t in timeout_s):
        raise ValueError("a timeout needs isolation='thread' or 'process'")
    if max_error_rate is not None and not 0.0 <= max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate must be in [0, 1] or None, got {max_error_rate}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    return isolation


def check_runner_settings(*, on_error: str = "skip", timeout_s: float | None = None, isolation: str | None = None,
                          max_error_rate: float | None = 0.5, min_samples: int = 256,
                          count_none_as_error: bool = False, mp_context: str | None = None) -> None:
    """Check a recipe's ``reward_failure`` settings (the keywords of :meth:`RewardRunner.from_specs`) without
    building a runner; raises ``TypeError`` for an unknown key and ``ValueError`` for a bad value."""
    if not isinstance(count_none_as_error, bool):
        raise ValueError(f"count_none_as_error must be true or false, got {count_none_as_error!r}")
    _check_settings([on_error], [timeout_s], isolation, max_error_rate, min_samples)


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
