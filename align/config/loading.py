"""Reading a recipe: YAML file, ``key.sub=value`` overrides, typed and validated config, and back to data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from align.config.paths import resolve_recipe_paths
from align.config.schema import build_section, renamed_error, yaml_load
from align.config.sections import RecipeConfig
from align.config.validate import validate
from align.options import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (``["a", "b", "c"]``, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the raw recipe mapping (creating sections as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a mapping, with a clear error for missing or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {p}")
    try:
        raw = yaml_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping at the top level, got {type(raw).__name__}")
    return raw


def _check_renamed(raw: dict[str, Any]) -> None:
    """Stop on a renamed key anywhere in the two top levels (stage sections are free-form mappings)."""
    for section, value in raw.items():
        if isinstance(value, dict):
            for key in value:
                err = renamed_error(str(section), str(key))
                if err is not None:
                    raise err


def config_from_dict(raw: dict[str, Any], *, source: str = "recipe", base_dir: str | Path | None = None
                     ) -> RecipeConfig:
    """Build and validate a :class:`RecipeConfig`; errors are prefixed with ``source``.

    Relative input paths are made absolute (:mod:`align.config.paths`): looked up in the current directory,
    then in ``base_dir`` (the recipe file's directory), then among the shipped files.
    """
    try:
        _check_renamed(raw)
        raw = resolve_recipe_paths(raw, base_dir, cwd_first=True)
        return validate(build_section(RecipeConfig, raw, ""))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Load a recipe file, apply ``key=value`` overrides, and validate the result.

    Relative input paths written in the file are looked up next to the file first; those given in
    ``overrides`` in the current directory first (:mod:`align.config.paths`).
    """
    base_dir = Path(path).parent
    raw = resolve_recipe_paths(load_recipe_dict(path), base_dir)
    raw = apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw, source=str(path), base_dir=base_dir)


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe as plain data (written next to each run for reproducibility)."""
    return dataclasses.asdict(cfg)
