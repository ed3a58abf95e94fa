"""Loading LLaDA checkpoints (no remote code) and checking LoRA target names.

Models are named as :mod:`align.models.resolve` describes: ``builtin:<name>``, a local directory or a
Hub id ``org/name[@revision]``; that module is the one place turning a name into a directory (and
owns :func:`load_tokenizer`, re-exported here). Released LLaDA / LLaDA 1.5 / iLLaDA directories carry
``architectures: ["LLaDAModelLM"]`` and an ``auto_map`` pointing to transformers-4 remote code; directories
saved by dlm-align carry copies of ``llada.py`` and ``configuration_llada.py`` and an ``auto_map`` naming them
(``docs/models.md``, "Portable checkpoints"). Both loaders here use the native
:class:`~align.models.llada.LLaDAModelLM` and :class:`~align.models.configuration_llada.LLaDAConfig` and never
execute code from the checkpoint.
"""

import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from align.models.llada import LLaDAConfig, LLaDAModelLM, check_mask_token_id
from align.models.resolve import ResolvedModel, load_tokenizer, resolve_model, resolve_model_dir

logger = logging.getLogger(__name__)


def read_config_dict(model_dir: str | os.PathLike) -> dict:
    """Read ``config.json`` of a checkpoint directory, with errors naming the file."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json in this directory")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_llada_config(config: dict) -> bool:
    """Whether a ``config.json`` dict describes the LLaDA architecture."""
    return config.get("model_type") == "llada" or "LLaDAModelLM" in (config.get("architectures") or [])


def device_map_for(device: str | torch.device | None) -> dict[str, str | torch.device] | None:
    """``from_pretrained`` device map that places the whole model on ``device`` (None: default)."""
    return None if device is None else {"": device}


def check_loading_info(model_dir: str | os.PathLike, info: dict, *, allow_unexpected: bool = False) -> None:
    """Raise ``ValueError`` when ``from_pretrained`` reported missing or mis-shaped weights, or
    unexpected ones (only logged when ``allow_unexpected``)."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(n) for n in info.get(key) or [])
        if names and key == "unexpected_keys" and allow_unexpected:
            logger.warning("%s: ignoring %d unexpected checkpoint weights: %s", model_dir, len(names), names[:8])
        elif names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{key.replace('_', ' ')}: {shown}")
    if problems:
        raise ValueError(f"{model_dir}: checkpoint weights do not match the model ({'; '.join(problems)})")


def load_model(
    path_or_name: str | os.PathLike | ResolvedModel,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> LLaDAModelLM:
    """Load a LLaDA checkpoint (sharded safetensors with index, or a single file) natively.

    Args:
        path_or_name: ``builtin:<name>``, a checkpoint directory or a Hub id ``org/name[@revision]``
            (see :func:`align.models.resolve.resolve_model`).
        dtype: parameter dtype; None keeps the checkpoint's dtype (``"auto"``).
        device: device to load onto (None: transformers' default, CPU).
        mask_token_id: override of ``config.mask_token_id`` (e.g. 5 for iLLaDA configs lacking it).
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or a registered attention kernel.

    Raises:
        FileNotFoundError: a spec that does not resolve, or no ``config.json``.
        ValueError: not a LLaDA config, unsupported config values, or weights that do not match.
    """
    model_dir = resolve_model_dir(path_or_name)
    raw = read_config_dict(model_dir)
    if not is_llada_config(raw):
        raise ValueError(
            f"{model_dir}/config.json: model_type {raw.get('model_type')!r} is not 'llada'; "
            "use align.models.load_denoiser for other denoisers"
        )
    try:
        config = LLaDAConfig.from_pretrained(model_dir)
    except ValueError as err:
        raise ValueError(f"{model_dir}/config.json: {err}") from err
    if mask_token_id is not None:
        config.mask_token_id = check_mask_token_id(mask_token_id, config.vocab_size)
    model, info = LLaDAModelLM.from_pretrained(
        model_dir,
        config=config,
        dtype="auto" if dtype is None else dtype,
        device_map=device_map_for(device),
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    check_loading_info(model_dir, info)
    return model


def load_model_and_tokenizer(
    path_or_name: str | os.PathLike | ResolvedModel,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> tuple[LLaDAModelLM, PreTrainedTokenizerBase]:
    """:func:`load_model` plus the tokenizer of the same checkpoint (any spec :func:`load_model` takes);
    warns when the tokenizer has more tokens than the model's ``vocab_size``."""
    resolved = resolve_model(path_or_name)
    model_dir = resolved.path
    model = load_model(
        resolved,
        dtype=dtype,
        device=device,
        mask_token_id=mask_token_id,
        attn_implementation=attn_implementation,
    )
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(resolved)
    if len(tokenizer) > model.config.vocab_size:
        logger.warning(
            "%s: tokenizer has %d tokens but the model's vocab_size is %d",
            model_dir,
            len(tokenizer),
            model.config.vocab_size,
        )
    return model, tokenizer


#: PEFT ``LoraConfig.bias`` values: which biases train besides the adapter (``none``, every bias, or the biases of
#: the adapted layers only).
LORA_BIAS = ("none", "all", "lora_only")
#: ``LoraConfig.init_lora_weights`` values a recipe may use. They leave the base weights untouched, so the adapter
#: saved alone applies to the base checkpoint it names.
LORA_INIT_WEIGHTS = (True, False, "gaussian", "orthogonal")
_REWRITES_BASE = ("rewrites the base weights before training, so the adapter saved alone would not apply to the "
                  "base checkpoint")
#: The other ``init_lora_weights`` values PEFT knows, each with the reason a recipe cannot use it.
LORA_INIT_UNSUPPORTED = {
    "pissa": _REWRITES_BASE,
    "olora": _REWRITES_BASE,
    "corda": _REWRITES_BASE,
    "eva": "needs a data-driven initialisation pass over the training data, which dlm-align does not run",
    "lora_ga": "needs a gradient-estimation pass before training, which dlm-align does not run",
    "loftq": "quantizes the base model and needs a loftq_config, which dlm-align does not set up",
    "mica": "uses its own layer variant (lora_B frozen), which dlm-align does not support",
}


def linear_leaf_names(module: nn.Module, exclude: nn.Module | None = None) -> list[str]:
    """Distinct last name components of the ``nn.Linear`` layers in ``module`` (first-seen order)."""
    skip = set() if exclude is None else {id(m) for m in exclude.modules()}
    names: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and id(sub) not in skip:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def _output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def lora_target_modules(model: nn.Module, *, full_names: bool = False) -> list[str]:
    """LoRA ``target_modules`` for a model or adapter.

    By default, layer names: LLaDA's ``q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out``
    (``docs/concepts.md`` §7); an adapter's own list (Dream, masked LMs: the body's linear layers); else the
    names of all linear layers but the output head. PEFT matches a name by suffix, so LLaDA's ``ff_out`` also
    selects the output head ``model.transformer.ff_out``; pass :func:`lora_exclude_modules` as
    ``LoraConfig(exclude_modules=...)`` to leave it out.

    With ``full_names=True``: the full module names (relative to ``model``) of the linear layers that carry those
    names, outside the output head, in module order. This is what a recipe's ``peft.target_modules: auto`` uses:
    a full name matches one module only, so the head is never adapted.
    """
    own = getattr(model, "lora_target_modules", None)
    head = _output_head(model)
    names = list(own()) if callable(own) else linear_leaf_names(model, exclude=head)
    if not full_names:
        return names
    skip = set() if head is None else {id(m) for m in head.modules()}
    wanted = set(names)
    return [name for name, sub in model.named_modules()
            if isinstance(sub, nn.Linear) and id(sub) not in skip and name.rsplit(".", 1)[-1] in wanted]


def lora_exclude_modules(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of its output head, for PEFT's ``LoraConfig(exclude_modules=...)``.

    Empty when ``model`` has no ``get_output_embeddings`` or it returns None.
    """
    head = _output_head(model)
    if head is None:
        return []
    return [name for name, sub in model.named_modules() if sub is head]


def check_lora_targets(model: nn.Module, targets: str | list[str], *, strict: bool = True,
                       label: str = "LoRA target(s)") -> dict[str, int]:
    """Count the parameterised modules each LoRA target matches, with PEFT's matching rules.

    A list entry ``t`` matches module ``name`` when ``name == t`` or ``name`` ends with ``"." + t``;
    a string is a regular expression matched against full names (``"all-linear"``: every linear layer).
    Targets matching nothing (e.g. ``o_proj``/``gate_proj``/``down_proj`` on LLaDA, which PEFT would
    silently skip) raise ``ValueError`` when ``strict`` and give a ``UserWarning`` otherwise; ``label``
    starts that message (e.g. ``"peft.exclude_modules"`` when checking exclusions).
    Returns ``{target: number of matched modules}``.
    """
    named = [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if isinstance(targets, str):
        if targets == "all-linear":
            count = sum(isinstance(m, nn.Linear) for _, m in named)
        else:
            count = sum(re.fullmatch(targets, n) is not None for n, _ in named)
        counts = {targets: count}
    else:
        counts = {t: sum(n == t or n.endswith("." + t) for n, _ in named) for t in targets}
    unmatched = [t for t, c in counts.items() if c == 0]
    if unmatched:
        message = (
            f"{label} {unmatched} match no module of {type(model).__name__}; "
            f"its targets are {lora_target_modules(model)}"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return counts
