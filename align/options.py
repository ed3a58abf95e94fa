"""Building blocks of self-validating option dataclasses.

Every section of a recipe is a dataclass that checks its own fields in ``__post_init__`` (as TRL's
``GRPOConfig`` does) and raises :class:`FieldError` naming the field. The recipe loader
(:mod:`align.config`) prefixes the section, so a user reads ``'grpo.epsilon' must be > 0``. This module
imports nothing from the rest of the package, so option classes can live beside the code they configure
(trainers, sampler) without an import cycle with :mod:`align.config`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A recipe key is unknown, has the wrong type, or conflicts with another key."""


class FieldError(ConfigError):
    """One field of an option dataclass has an impossible value.

    Attributes:
        key: the field's name inside its section (``epsilon``; ``loop_guard.penalty`` for nested keys).
        reason: what is wrong, as the end of a sentence that starts with the key. Other fields of the same
            section that it names are quoted (``'block_length'``) and listed in ``others``.
        others: the other fields named in ``reason``; they are prefixed with the section too.
    """

    def __init__(self, key: str, reason: str, others: tuple[str, ...] = ()) -> None:
        super().__init__(f"'{key}' {reason}")
        self.key = key
        self.reason = reason
        self.others = others

    def within(self, section: str) -> ConfigError:
        """The same problem, with the keys prefixed by ``section`` (``grpo`` -> ``'grpo.epsilon' ...``)."""
        if not section:
            return ConfigError(str(self))
        reason = self.reason
        for name in self.others:
            reason = reason.replace(f"'{name}'", f"'{section}.{name}'")
        return ConfigError(f"'{section}.{self.key}' {reason}")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`FieldError` unless ``value`` is one of ``choices`` (listed in the message)."""
    options = tuple(choices)
    if value not in options:
        raise FieldError(key, f"must be one of {', '.join(_shown(c) for c in options)}, got {value!r}")


def check_range(key: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`FieldError` unless ``low <= value <= high`` (``<`` on an open side; None = unbounded)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if high is None:
        bound = f"{'>' if low_open else '>='} {_shown(low)}"
    elif low is None:
        bound = f"{'<' if high_open else '<='} {_shown(high)}"
    else:
        bound = f"in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"
    raise FieldError(key, f"must be {bound}, got {_shown(value)}")
