"""Reward registry: YAML names (with weights and arguments) to reward callables.

A recipe lists rewards as ``[{name: accuracy, weight: 2.0}, {name: loop_penalty, weight: 1.0, p_max: 8}]``.
Each entry's ``name`` is a registered name (:func:`available_rewards`) or an import path
``"package.module:attribute"``; ``weight`` defaults to 1.0; ``on_error`` and ``timeout_s`` are read
by :class:`~align.rewards.runner.RewardRunner`; every other key is an argument of the reward.

A registered entry is either a *factory* (called with the arguments, returns the reward callable,
e.g. ``LoopPenalty``) or a *function* that already has TRL's reward signature (its extra keyword
parameters are bound from the arguments, e.g. TRL's ``reasoning_accuracy_reward(reasoning_delimiters=...)``).
For an import path: a class is a factory; a function with a ``prompts``, ``completions`` or
``completion_ids`` parameter is a reward function; any other function is a factory; any other
callable object is used as it is. Unknown names and unknown arguments raise
:class:`RewardSpecError` naming the reward.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .accuracy import AnswerAccuracy, task_accuracy
from .countdown import CountdownAccuracy
from .formats import RegexFormat, answer_phrase_format, answer_tag_format, boxed_format, think_answer_format
from .length import SoftOverlongPunishment
from .loop_reward import LoopPenalty
from .steps import StepAccuracy

__all__ = [
    "BoundReward",
    "RewardSpec",
    "RewardSpecError",
    "UnknownRewardError",
    "available_rewards",
    "build_rewards",
    "check_reward_specs",
    "parse_reward_spec",
    "register_reward",
    "resolve_reward",
    "reward_name",
]

RewardFunction = Callable[..., list]
CALL_PARAMS = frozenset({"prompts", "completions", "completion_ids"})
RUNNER_KEYS = frozenset({"on_error", "timeout_s"})
#: what happens to a sample whose reward failed: left out (``skip``), scored 0 (``zero``), or the run stops.
POLICIES = ("skip", "zero", "abort")


class RewardSpecError(ValueError):
    """A reward entry in a recipe is malformed: unknown name, unknown or missing argument, bad weight."""


class UnknownRewardError(RewardSpecError):
    """No reward is registered under this name (and it is not an import path)."""


@dataclass(frozen=True)
class _Entry:
    target: Callable[..., Any] | str  # a callable, or "module:attr" imported on first use
    factory: bool


_REGISTRY: dict[str, _Entry] = {}


def register_reward(
    name: str, target: Callable[..., Any] | str, *, factory: bool = False, overwrite: bool = False
) -> None:
    """Register ``target`` under ``name`` (``factory=True``: ``target(**kwargs)`` builds the reward)."""
    if not overwrite and name in _REGISTRY:
        raise RewardSpecError(f"a reward named {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = _Entry(target, factory)


def available_rewards() -> list[str]:
    """Registered reward names."""
    return sorted(_REGISTRY)


def _import(path: str, for_name: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardSpecError(f"reward {for_name!r}: import path must look like 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardSpecError(f"reward {for_name!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward {for_name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(f"reward {for_name!r}: {path!r} is not callable")
    return obj


def _params(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}, True
    named = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


class BoundReward:
    """A reward function with some keyword arguments fixed (picklable when ``func`` is module-level)."""

    def __init__(self, func: RewardFunction, kwargs: Mapping[str, Any], name: str | None = None) -> None:
        self.func = func
        self.kwargs = dict(kwargs)
        self.__name__ = name or reward_name(func)

    def __call__(self, *args: Any, **kwargs: Any) -> list:
        """Call the wrapped reward with the bound arguments (they win over same-named columns)."""
        return self.func(*args, **{**kwargs, **self.kwargs})

    def __repr__(self) -> str:
        return f"BoundReward({self.__name__!r}, {self.kwargs})"


def _check_arguments(name: str, target: Callable[..., Any], factory: bool, kwargs: Mapping[str, Any]) -> None:
    """Check ``kwargs`` against the factory's (or the bound function's) signature without calling it."""
    named, _ = _params(target)
    if factory:
        unknown = [k for k in kwargs if k not in named or k == "self"]
        if unknown:
            raise RewardSpecError(f"reward {name!r}: unknown argument(s) {unknown}; it accepts {sorted(named)}")
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as e:
            raise RewardSpecError(f"reward {name!r}: {e}") from e
        except ValueError:
            pass  # no introspectable signature
        return
    allowed = sorted(set(named) - CALL_PARAMS)
    unknown = [k for k in kwargs if k not in allowed]
    if kwargs and unknown:
        raise RewardSpecError(f"reward {name!r}: unknown argument(s) {unknown}; it accepts {allowed}")


def _build(name: str, target: Callable[..., Any], factory: bool, kwargs: Mapping[str, Any]) -> RewardFunction:
    _check_arguments(name, target, factory, kwargs)
    if factory:
        try:
            reward = target(**kwargs)
        except (TypeError, ValueError) as e:
            raise RewardSpecError(f"reward {name!r}: {e}") from e
        if not callable(reward):
            raise RewardSpecError(f"reward {name!r}: the factory returned {type(reward).__name__}, not a callable")
        return reward
    return BoundReward(target, kwargs) if kwargs else target


def _target(name: str) -> tuple[Callable[..., Any], bool]:
    """The callable a reward name refers to, and whether it is a factory."""
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        target = _import(entry.target, name) if isinstance(entry.target, str) else entry.target
        return target, entry.factory
    if ":" in name:
        target = _import(name, name)
        if inspect.isclass(target):
            return target, True
        if inspect.isfunction(target) or inspect.ismethod(target) or isinstance(target, functools.partial):
            named, _ = _params(target)
            return target, not (CALL_PARAMS & set(named))
        return target, False
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"; did you mean {close}?" if close else ""
    raise UnknownRewardError(
        f"unknown reward {name!r}{hint} Registered: {available_rewards()}, or use 'package.module:callable'"
    )


def resolve_reward(name: str, **kwargs: Any) -> RewardFunction:
    """The reward callable for a registered ``name`` or ``"module:attr"`` import path, built with ``kwargs``."""
    target, factory = _target(name)
    return _build(name, target, factory, kwargs)


@dataclass(frozen=True)
class RewardSpec:
    """One parsed recipe entry."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    on_error: str | None = None
    timeout_s: float | None = None


def parse_reward_spec(spec: RewardSpec | Mapping[str, Any] | str) -> RewardSpec:
    """Parse ``"name"`` or ``{name: ..., weight: ..., on_error: ..., timeout_s: ..., **kwargs}``."""
    if isinstance(spec, RewardSpec):
        return spec
    if isinstance(spec, str):
        return RewardSpec(spec)
    if not isinstance(spec, Mapping):
        raise RewardSpecError(f"a reward entry must be a name or a mapping with 'name', got {type(spec).__name__}")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise RewardSpecError(f"reward entry {dict(spec)} has no 'name'")
    name = spec["name"]
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise RewardSpecError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
    timeout = spec.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise RewardSpecError(f"reward {name!r}: timeout_s must be a positive number, got {timeout!r}")
    on_error = spec.get("on_error")
    if on_error is not None and on_error not in POLICIES:
        raise RewardSpecError(f"reward {name!r}: on_error must be one of {', '.join(POLICIES)}, got {on_error!r}")
    kwargs = {k: v for k, v in spec.items() if k not in {"name", "weight"} | RUNNER_KEYS}
    return RewardSpec(name, float(weight), kwargs, on_error, None if timeout is None else float(timeout))


def build_rewards(
    specs: Sequence[RewardSpec | Mapping[str, Any] | str],
) -> tuple[list[RewardFunction], list[float]]:
    """Reward callables and their weights, in recipe order."""
    if isinstance(specs, str | Mapping):
        raise RewardSpecError("rewards must be a list of entries")
    parsed = [parse_reward_spec(s) for s in specs]
    return [resolve_reward(s.name, **s.kwargs) for s in parsed], [s.weight for s in parsed]


def check_reward_specs(specs: Sequence[RewardSpec | Mapping[str, Any] | str]) -> list[RewardSpec]:
    """Parse recipe entries and check each name and its arguments without building any reward.

    Names are looked up (an import path is imported) and arguments are matched against the signature, so
    a typo fails at load time while a reward model is only loaded when the trainer builds its rewards.
    """
    if isinstance(specs, str | Mapping):
        raise RewardSpecError("rewards must be a list of entries")
    parsed = [parse_reward_spec(s) for s in specs]
    for spec in parsed:
        target, factory = _target(spec.name)
        _check_arguments(spec.name, target, factory, spec.kwargs)
    return parsed


def reward_name(func: Any) -> str:
    """The name a reward is logged under (``__name__``, else its class name)."""
    name = getattr(func, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(func, functools.partial):
        return reward_name(func.func)
    return type(func).__name__


def _register_builtins() -> None:
    acc = functools.partial(AnswerAccuracy, answer_columns=("answer", "solution"), name="math_accuracy")
    register_reward("accuracy", acc, factory=True)
    register_reward("math_accuracy", acc, factory=True)
    task = functools.partial(
        AnswerAccuracy, answer_columns=("answer",), order=task_accuracy.order, name="task_accuracy"
    )
    register_reward("task_accuracy", task, factory=True)
    register_reward("step_accuracy", StepAccuracy, factory=True)
    register_reward("countdown", CountdownAccuracy, factory=True)
    register_reward("think_answer_format", think_answer_format)
    register_reward("answer_tag_format", answer_tag_format)
    register_reward("boxed_format", boxed_format)
    register_reward("answer_phrase_format", answer_phrase_format)
    register_reward("regex_format", RegexFormat, factory=True)
    register_reward("soft_overlong_punishment", SoftOverlongPunishment, factory=True)
    register_reward("loop_penalty", LoopPenalty, factory=True)
    register_reward("reward_model", "align.rewards.reward_model:SequenceClassificationReward", factory=True)
    # TRL's ready rewards, unchanged (imported on first use)
    register_reward("trl.accuracy_reward", "trl.rewards:accuracy_reward")
    register_reward("trl.reasoning_accuracy_reward", "trl.rewards:reasoning_accuracy_reward")
    register_reward("trl.think_format_reward", "trl.rewards:think_format_reward")
    register_reward("trl.cosine_scaled_reward", "trl.rewards:get_cosine_scaled_reward", factory=True)
    register_reward("trl.repetition_penalty", "trl.rewards:get_repetition_penalty_reward", factory=True)
    register_reward("trl.soft_overlong_punishment", "trl.rewards:get_soft_overlong_punishment", factory=True)


_register_builtins()
