"""Paths in a recipe: where a relative path points, and whether every input exists before a run.

Input paths are ``model.path`` and ``model.tokenizer`` (directories; ``builtin:`` names and Hub ids are left
as they are), ``data.train_files`` and ``data.eval_files``, the configuration files of a stage
(:data:`STAGE_PATH_KEYS`: ``deepspeed``, ``accelerator_config``, ``fsdp_config``) and the ``path`` of a
``reward_model`` reward. A relative input path is looked up

1. for a path written in the recipe file: next to the recipe file, then among the files shipped with the
   recipes (``recipes/accelerate/zero3.json`` or ``accelerate/zero3.json``), then in the current directory;
2. for a path given on the command line (``key=value``) or to :func:`align.config.config_from_dict`: in the
   current directory first, then next to the recipe file, then among the shipped files.

The first candidate that exists wins; when none does, the first candidate is kept (and reported missing).
The resolved absolute path is what the config holds, what ``recipe.yaml`` records and what runs.
``output_dir`` is an output, not an input: it stays relative to the current directory.

:func:`check_paths` checks every input of a loaded recipe without loading anything: files and directories
exist, JSON files parse, and Hub ids are looked up in the local Hugging Face cache only (a Hub id that is not
cached is a problem with ``HF_HUB_OFFLINE=1``, and otherwise a note that the run will download it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config.sections import STAGES as _STAGES

#: TrainingArguments fields of a stage section that name a configuration file.
STAGE_PATH_KEYS = ("deepspeed", "accelerator_config", "fsdp_config")


def path_candidates(value: str, base_dir: str | Path | None, *, cwd_first: bool = False) -> list[Path]:
    """Absolute places where the input path ``value`` may be, in the order of the rule above."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    from align.recipes import shipped_file

    here = Path.cwd() / p
    beside = [Path(base_dir).resolve() / p] if base_dir is not None else []
    shipped = [s for s in (shipped_file(value),) if s is not None]
    order = [here, *beside, *shipped] if cwd_first else [*beside, *shipped, here]
    return [Path(os.path.abspath(c)) for c in dict.fromkeys(order)]


def resolve_input_path(value: str, base_dir: str | Path | None, *, cwd_first: bool = False) -> str:
    """The absolute path ``value`` stands for: the first existing candidate, else the first candidate."""
    options = path_candidates(value, base_dir, cwd_first=cwd_first)
    return str(next((c for c in options if c.exists()), options[0]))


def resolve_model_spec(value: str, base_dir: str | Path | None, *, cwd_first: bool = False) -> str:
    """A model or tokenizer spec with a relative directory made absolute; ``builtin:`` names and Hub ids
    (``org/name[@revision]`` that exists nowhere locally) are returned unchanged."""
    from align.models.resolve import BUILTIN_PREFIX, parse_hub_id

    if value.startswith(BUILTIN_PREFIX):
        return value
    options = path_candidates(value, base_dir, cwd_first=cwd_first)
    found = next((c for c in options if c.exists()), None)
    if found is not None:
        return str(found)
    return value if parse_hub_id(value) is not None else str(options[0])


def resolve_recipe_paths(raw: dict[str, Any], base_dir: str | Path | None, *, cwd_first: bool = False
                         ) -> dict[str, Any]:
    """A copy of the raw recipe mapping with every input path resolved (values of the wrong type are left for
    the schema check to report)."""
    out = copy.deepcopy(raw)

    def fix(section: Any, key: str, fn: Any) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            section[key] = fn(section[key], base_dir, cwd_first=cwd_first)

    model, data = out.get("model"), out.get("data")
    for key in ("path", "tokenizer"):
        fix(model, key, resolve_model_spec)
    if isinstance(data, dict):
        for key in ("train_files", "eval_files"):
            files = data.get(key)
            if isinstance(files, list):
                data[key] = [resolve_input_path(f, base_dir, cwd_first=cwd_first) if isinstance(f, str) else f
                             for f in files]
    for stage in _STAGES:
        for key in STAGE_PATH_KEYS:
            fix(out.get(stage), key, resolve_input_path)
    grpo = out.get("grpo")
    rewards = grpo.get("rewards") if isinstance(grpo, dict) else None
    for spec in rewards if isinstance(rewards, list) else []:
        if isinstance(spec, dict) and spec.get("name") == "reward_model":
            fix(spec, "path", resolve_input_path)
    return out


# ------------------------------------------------------------------------------------------ checking
@dataclass(frozen=True)
class PathCheck:
    """The state of one input path.

    Attributes:
        key: the dotted recipe key (``data.train_files[1]``, ``sft.deepspeed``).
        value: the (resolved) value the recipe holds.
        status: ``ok``; ``missing`` (a problem: the message says why); or ``download`` (a Hub id that is not
            in the local cache: the run will download it).
        message: what was found or what is wrong.
        directory: the local directory of a model or tokenizer spec, when it resolved.
    """

    key: str
    value: str
    status: str
    message: str
    directory: Path | None = None

    @property
    def problem(self) -> bool:
        """Whether this path stops a run."""
        return self.status == "missing"


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Within this block :mod:`align.models.resolve` reads the Hugging Face cache and never contacts the Hub."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def check_model_spec(key: str, spec: str, *, model: bool = True, tokenizer: bool = True) -> PathCheck:
    """Check a model spec (``model``: it has a ``config.json``) that also names a tokenizer (``tokenizer``: it
    has tokenizer files, or is a built-in tokenizer), without downloading or loading anything."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from align.models.resolve import (
        BUILTIN_PREFIX,
        TOKENIZER_FILES,
        builtin_tokenizers,
        hub_offline,
        parse_hub_id,
        resolve_model,
    )

    if not model and spec.startswith(BUILTIN_PREFIX) and spec[len(BUILTIN_PREFIX):] in builtin_tokenizers():
        return PathCheck(key, spec, "ok", "built-in tokenizer")
    offline = hub_offline()
    try:
        with cache_only():
            resolved = resolve_model(spec)
    except FileNotFoundError as err:
        is_hub = not Path(spec).expanduser().exists() and parse_hub_id(spec) is not None
        if is_hub and not offline and isinstance(err.__cause__, LocalEntryNotFoundError):
            from align.models.resolve import hub_cache_dir

            return PathCheck(key, spec, "download", f"Hub id, not in the local Hugging Face cache at "
                             f"{hub_cache_dir()}: `dlm-align run` will download it")
        return PathCheck(key, spec, "missing", str(err))
    lacks = [what for what, need, names in (("config.json", model, ("config.json",)),
                                            ("tokenizer files", tokenizer, TOKENIZER_FILES))
             if need and not any((resolved.path / n).is_file() for n in names)]
    if lacks:
        return PathCheck(key, spec, "missing", f"{resolved.path}: no {' and no '.join(lacks)} in this directory",
                         resolved.path)
    where = "Hub cache" if resolved.kind == "hub" else resolved.kind
    return PathCheck(key, spec, "ok", f"{where}: {resolved.path}", resolved.path)


def _check_file(key: str, value: str, *, json_file: bool = False, directory: bool = False) -> PathCheck:
    p = Path(value)
    if directory:
        ok = p.is_dir()
        return PathCheck(key, value, "ok" if ok else "missing", "directory" if ok else
                         f"{value}: directory does not exist" if not p.exists() else f"{value}: not a directory")
    if not p.is_file():
        return PathCheck(key, value, "missing", f"{value}: file does not exist" if not p.exists() else
                         f"{value}: not a file")
    if json_file:
        try:
            json.loads(p.read_text())
        except (OSError, ValueError) as err:
            return PathCheck(key, value, "missing", f"{value}: not valid JSON ({err})")
    return PathCheck(key, value, "ok", "file")


def check_paths(cfg: Any) -> list[PathCheck]:
    """Check every input path of a loaded recipe (:class:`~align.config.RecipeConfig`); all of them, so
    that one report names every problem."""
    checks: list[PathCheck] = []
    m = cfg.model
    if m.path is not None:
        checks.append(check_model_spec("model.path", m.path, tokenizer=m.tokenizer is None))
    if m.tokenizer is not None:
        checks.append(check_model_spec("model.tokenizer", m.tokenizer, model=False))
    for key in ("train_files", "eval_files"):
        for i, f in enumerate(getattr(cfg.data, key) or []):
            checks.append(_check_file(f"data.{key}[{i}]", f))
    for stage in cfg.stages:
        section = getattr(cfg, stage)
        for key in STAGE_PATH_KEYS:
            if isinstance(section.get(key), str):
                checks.append(_check_file(f"{stage}.{key}", section[key], json_file=True))
    if "grpo" in cfg.stages:
        for i, spec in enumerate(cfg.grpo.get("rewards") or []):
            if isinstance(spec, dict) and spec.get("name") == "reward_model" and isinstance(spec.get("path"), str):
                checks.append(_check_file(f"grpo.rewards[{i}].path", spec["path"], directory=True))
    return checks


def missing_paths_error(checks: list[PathCheck]) -> FileNotFoundError | None:
    """One error naming every missing input, or None when all exist."""
    bad = [c for c in checks if c.problem]
    if not bad:
        return None
    lines = "\n".join(f"  {c.key}: {c.message}" for c in bad)
    return FileNotFoundError(f"{len(bad)} input path(s) of the recipe are missing:\n{lines}")
