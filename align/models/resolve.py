"""The one place that turns a model or tokenizer name into a local directory.

A *spec* names a checkpoint in one of three ways:

- ``builtin:<name>``: a checkpoint shipped with the package (``data/checkpoints/<name>``, found with
  :mod:`importlib.resources`), e.g. ``builtin:quickstart-base``;
- a local directory (``runs/quickstart/sft/final``, ``~/ckpt/LLaDA-8B-Instruct``);
- a Hugging Face Hub id ``org/name`` or ``org/name@revision`` (a branch, tag or commit), resolved
  through the Hugging Face cache with ``huggingface_hub.snapshot_download``. With ``HF_HUB_OFFLINE=1``
  only the local cache is used.

A path that exists locally always wins over a Hub id of the same spelling. Every failure is a
``FileNotFoundError`` whose message names the spec and says how to fix it.

Tokenizers take the same specs, plus ``builtin:arithmetic``: the embedded word-level tokenizer of the
built-in arithmetic task, built in memory.

Used by :func:`align.models.load_model` / :func:`~align.models.load_model_and_tokenizer` /
:func:`~align.models.load_denoiser`, by recipes (``model.path``, ``model.tokenizer``, through
:mod:`align.build`) and by ``dlm-align generate --model``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "BUILTIN_PREFIX",
    "DTYPES",
    "TOKENIZER_FILES",
    "ResolvedModel",
    "builtin_checkpoints",
    "builtin_tokenizers",
    "hub_cache_dir",
    "hub_offline",
    "load_tokenizer",
    "parse_hub_id",
    "resolve_model",
    "resolve_model_dir",
]

BUILTIN_PREFIX = "builtin:"

#: Weight dtypes by name (recipes' ``model.dtype``, ``dlm-align generate --dtype``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Files of which at least one marks a directory as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")

# A Hub repo id: "org/name" (letters, digits, '-', '_', '.'; no leading '.' or '-'), optionally "@revision".
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*)(?:@(?P<revision>[^\s@]+))?")

Kind = Literal["builtin", "local", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points.

    Attributes:
        spec: the spec as given (``builtin:quickstart-base``, ``runs/x/final``, ``org/name@v1``).
        path: the local checkpoint directory.
        kind: ``"builtin"``, ``"local"`` or ``"hub"``.
        repo_id: Hub repo id (``hub`` only).
        revision: requested Hub revision (``hub`` only; None = the default branch).
        commit: commit hash of the cached Hub snapshot (``hub`` only, when known).

    ``os.fspath(resolved)`` is ``str(resolved.path)``, so it can be passed wherever a path is expected.
    """

    spec: str
    path: Path
    kind: Kind
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


# ------------------------------------------------------------------------------------------- built-ins
def _builtin_root() -> Path | None:
    root = resources.files("align.data") / "checkpoints"
    return root if isinstance(root, Path) and root.is_dir() else None


def builtin_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with the package (``builtin:<name>``)."""
    root = _builtin_root()
    if root is None:
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def _arithmetic_tokenizer() -> Any:
    from align.data.task import corpus_for_tokenizer
    from align.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(corpus_for_tokenizer())


_BUILTIN_TOKENIZERS: dict[str, Callable[[], Any]] = {"arithmetic": _arithmetic_tokenizer}


def builtin_tokenizers() -> list[str]:
    """Names of the tokenizers built in memory (``builtin:<name>``); checkpoints also name tokenizers."""
    return sorted(_BUILTIN_TOKENIZERS)


def _resolve_builtin(spec: str) -> ResolvedModel:
    name = spec[len(BUILTIN_PREFIX):]
    available = builtin_checkpoints()
    if name in available:
        return ResolvedModel(spec=spec, path=_builtin_root() / name, kind="builtin")
    shown = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in available) or "none"
    if name in _BUILTIN_TOKENIZERS:
        raise FileNotFoundError(f"{spec} is a built-in tokenizer, not a checkpoint; built-in checkpoints: {shown}")
    hint = " (quickstart-base is rebuilt with: dlm-align run quickstart-pretrain)" if name == "quickstart-base" else ""
    raise FileNotFoundError(f"no built-in checkpoint {name!r}; available: {shown}{hint}")


# ------------------------------------------------------------------------------------------------ Hub
def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the Hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set
    now, or as huggingface_hub read it at import time."""
    if _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache directory, from the environment as it is now.

    Same precedence as huggingface_hub (which reads it once, at import): ``HF_HUB_CACHE``, then
    ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then ``$XDG_CACHE_HOME/huggingface/hub``, then
    ``~/.cache/huggingface/hub``.
    """
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        path = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(path)))


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of a spec shaped like ``org/name[@revision]``; None for anything else."""
    match = _HUB_ID.fullmatch(spec)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def _resolve_hub(spec: str, repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()
    rev_arg = f" --revision {revision}" if revision else ""
    fix = (f"download it once with network access (`hf download {repo_id}{rev_arg}`, formerly "
           f"`huggingface-cli download`), or pass the path of a local checkpoint directory")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline))
    except IncompleteSnapshotError as err:
        raise FileNotFoundError(f"{spec}: the copy in the local Hugging Face cache at {cache} is incomplete ({err}); "
                                f"{fix}") from err
    except LocalEntryNotFoundError as err:
        if offline:
            why = "offline mode (HF_HUB_OFFLINE=1) is on and"
        else:
            cause = err.__cause__ or err
            why = f"the Hub could not be reached ({type(cause).__name__}: {cause}) and"
        raise FileNotFoundError(f"{spec}: not a local directory; as a Hub id, {why} it is not in the local "
                                f"Hugging Face cache at {cache}. To fix: {fix}") from err
    except Exception as err:  # repo or revision not found, gated, auth errors, invalid ids
        raise FileNotFoundError(f"{spec}: not a local directory, and not available from the Hugging Face Hub "
                                f"({type(err).__name__}: {err})") from err
    commit = path.name if path.parent.name == "snapshots" else None
    return ResolvedModel(spec=spec, path=path, kind="hub", repo_id=repo_id, revision=revision, commit=commit)


# ------------------------------------------------------------------------------------------- resolving
def resolve_model(spec: str | os.PathLike | ResolvedModel) -> ResolvedModel:
    """Resolve a model spec (``builtin:<name>``, a local directory, or a Hub id ``org/name[@rev]``).

    Raises:
        FileNotFoundError: unknown built-in name (the message lists the available ones), a path that is a
            file or does not exist, or a Hub id that is neither cached nor downloadable (offline: the
            message names the cache directory and how to fill it).
    """
    if isinstance(spec, ResolvedModel):
        return spec
    text = os.fspath(spec)
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{text}: expected a checkpoint directory, found a file")
        return ResolvedModel(spec=text, path=path, kind="local")
    hub = parse_hub_id(text) if isinstance(spec, str) else None
    if hub is not None:
        return _resolve_hub(text, *hub)
    raise FileNotFoundError(f"{text}: checkpoint directory does not exist (a model is named by a directory, "
                            f"builtin:<name> or a Hub id org/name)")


def resolve_model_dir(spec: str | os.PathLike | ResolvedModel) -> Path:
    """The local directory of a model spec: ``resolve_model(spec).path``."""
    return resolve_model(spec).path


def load_tokenizer(spec: str | os.PathLike | ResolvedModel) -> Any:
    """The tokenizer a spec names: ``builtin:arithmetic`` (built in memory), or ``AutoTokenizer`` of
    the directory :func:`resolve_model` gives (no remote code).

    Raises:
        FileNotFoundError: the spec does not resolve, or its directory has no tokenizer files.
    """
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX) and spec[len(BUILTIN_PREFIX):] in _BUILTIN_TOKENIZERS:
        return _BUILTIN_TOKENIZERS[spec[len(BUILTIN_PREFIX):]]()
    resolved = resolve_model(spec)
    if not any((resolved.path / name).is_file() for name in TOKENIZER_FILES):
        where = resolved.spec if str(resolved.path) == resolved.spec else f"{resolved.spec} ({resolved.path})"
        raise FileNotFoundError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
