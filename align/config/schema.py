"""Turning YAML mappings into typed section dataclasses: types, unknown and renamed keys.

:func:`build_section` checks each key against the dataclass's fields and type hints, then builds it; the
dataclass's ``__post_init__`` checks values (:class:`~align.options.FieldError`), and the error is re-raised
with the section's dotted path. Keys that were renamed get an error naming the new key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from align.options import ConfigError, FieldError

#: recipe keys that were renamed: old dotted key -> new key (one name per concept).
RENAMED_KEYS = {
    "grpo.max_completion_length": "gen_length",
    "grpo.steps": "denoising_steps",
    "eval.steps": "denoising_steps",
}


class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` / ``5E+2`` as floats (YAML 1.1 requires a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*)\.\d*(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.\d+(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def dotted(where: str, key: str) -> str:
    """``where.key`` (or ``key`` at the top level)."""
    return f"{where}.{key}" if where else key


def renamed_error(where: str, key: str) -> ConfigError | None:
    """The error for a renamed key, or None when ``where.key`` was not renamed."""
    new = RENAMED_KEYS.get(dotted(where, key))
    if new is None:
        return None
    return ConfigError(f"'{dotted(where, key)}' was renamed: use '{dotted(where, new)}'")


def unknown_key(key: str, valid: list[str], where: str, *, valid_hint: str | None = None) -> ConfigError:
    """An unknown-key error with the closest valid key and the valid keys (or ``valid_hint``)."""
    renamed = renamed_error(where, key)
    if renamed is not None:
        return renamed
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if valid_hint is not None:
        return ConfigError(f"unknown key '{dotted(where, key)}'{hint}: {valid_hint}")
    return ConfigError(f"unknown key '{dotted(where, key)}'{hint}; valid keys here: {', '.join(sorted(valid))}")


def split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``data`` into the keys that are fields of ``cls`` and the rest."""
    own = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in own}, {k: v for k, v in data.items() if k not in own}


def build_section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; errors name ``where.<key>``."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key(str(key), names, where)
        path = dotted(where, key)
        tp = hints[key]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            target = tp if dataclasses.is_dataclass(tp) else inner[0]
            kwargs[key] = None if value is None and inner else build_section(target, value, path)
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise exc.within(where) from None
