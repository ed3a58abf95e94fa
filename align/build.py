"""Build the model and tokenizer a recipe asks for, with an optional LoRA adapter.

``model.path`` and ``model.tokenizer`` are resolved by :mod:`align.models.resolve` (the one place that
turns a name into a directory): ``builtin:<name>`` for a checkpoint shipped in the package
(``data/checkpoints/<name>``), a local checkpoint directory, or a Hugging Face Hub id
``org/name[@revision]`` (from the local cache when ``HF_HUB_OFFLINE=1``). ``model.adapter`` says how the
checkpoint is loaded (:func:`align.models.adapters.load_denoiser`: LLaDA natively, Dream and other masked LMs
through their adapters). ``model.init_config`` builds a randomly initialised native LLaDA model instead.
``builtin:arithmetic`` as tokenizer builds the embedded word-level tokenizer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from align.config import ConfigError, ModelConfig, PeftConfig
from align.models.resolve import DTYPES
from align.models.resolve import load_tokenizer as build_tokenizer
from align.rng import derive_seed

__all__ = ["apply_lora", "build_model", "build_model_and_tokenizer", "build_tokenizer"]

logger = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None, tokenizer: Any = None, seed: int = 0
                ) -> torch.nn.Module:
    """The model of ``cfg``: loaded from ``path`` as ``model.adapter`` says, or randomly initialised from
    ``init_config`` (the same weights for the same ``seed``, whatever the process did before; the global RNG is left
    as it was). ``tokenizer`` (the recipe's) supplies the mask id of a wrapped model whose checkpoint names none."""
    from align.models import LLaDAConfig, LLaDAModelLM
    from align.models.adapters import MissingMaskTokenError, load_denoiser

    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        try:
            model = load_denoiser(cfg.path, cfg.adapter, dtype=dtype, mask_token_id=cfg.mask_token_id,
                                  attn_implementation=cfg.attn_implementation, tokenizer=tokenizer)
        except MissingMaskTokenError as exc:
            raise ConfigError(f"'model.mask_token_id' is required: {exc}") from exc
    else:
        fields = dict(cfg.init_config or {})
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
            fields.setdefault("embedding_size", fields["vocab_size"])
        if cfg.mask_token_id is not None:
            fields["mask_token_id"] = cfg.mask_token_id
        try:
            config = LLaDAConfig(**fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"'model.init_config': {exc}") from exc
        config._attn_implementation = cfg.attn_implementation
        # The initial weights come from their own stream: (seed, 'INIT' in ASCII), inside a forked RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0x494E4954))
            model = LLaDAModelLM(config).to(dtype)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            name = type(getattr(model, "model", model)).__name__
            raise ConfigError(f"'model.gradient_checkpointing': {name} (loaded from {cfg.path}) does not support "
                              "gradient checkpointing; set it to false")
        model.activation_checkpointing_enable()
    return model


def build_model_and_tokenizer(cfg: ModelConfig, *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer of a recipe's ``model`` section; checks that their special ids agree. ``seed`` (the
    recipe's) sets the initial weights of a model built from ``init_config``.

    A wrapped model (Dream, masked LMs) whose config has no EOS id takes the tokenizer's, which the sampler
    needs to end completions.
    """
    tok_spec = cfg.tokenizer or cfg.path
    if tok_spec is None:
        raise ConfigError("'model.tokenizer' is required when 'model.path' is not set")
    tokenizer = build_tokenizer(tok_spec)
    model = build_model(cfg, vocab_size=len(tokenizer), tokenizer=tokenizer, seed=seed)
    if tokenizer.mask_token_id is not None and cfg.mask_token_id is None and \
            tokenizer.mask_token_id != model.mask_token_id:
        logger.warning("tokenizer mask token id %s differs from the model's %s; the model's is used",
                       tokenizer.mask_token_id, model.mask_token_id)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    if getattr(model.config, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def apply_lora(model: torch.nn.Module, cfg: PeftConfig, *, base_model: str | None = None,
               seed: int | None = None) -> torch.nn.Module:
    """Wrap ``model`` with the LoRA adapter of a recipe's ``peft`` section; log its trainable parameter count.

    ``target_modules: auto`` adapts the body's linear layers by full module name
    (:func:`align.models.lora_target_modules` with ``full_names=True``), so the output head is never adapted.
    Names or patterns in ``target_modules``, ``exclude_modules`` or ``modules_to_save`` that match no module raise
    :class:`~align.config.ConfigError` naming the key; a ``target_modules`` entry that also matches the output head
    is logged as a warning. ``base_model``, the spec of the model being adapted (``builtin:<name>``, a directory, or
    a Hub id ``org/name[@revision]``), is recorded as the adapter's ``base_model_name_or_path`` (and ``revision``),
    where ``dlm-align merge`` finds it. ``seed`` seeds the adapter's initial weights (inside
    ``torch.random.fork_rng``, so the global RNG is left as it was); None draws them from the global RNG.
    A model that already carries an adapter (the previous stage ran with ``peft.merge: false``) is returned
    unchanged: training continues that adapter.

    The log line reads ``... N trainable of M parameters``; with plain LoRA, N is ``r * (in + out)`` summed over the
    adapted linear layers.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from align.models import check_lora_targets, lora_target_modules
    from align.models.resolve import BUILTIN_PREFIX, parse_hub_id

    if hasattr(model, "peft_config"):
        logger.info("continuing the LoRA adapter of the previous stage (peft.merge: false)")
        return model
    auto = cfg.target_modules == "auto"
    targets = lora_target_modules(model, full_names=True) if auto else cfg.target_modules
    try:
        if not targets:
            raise ValueError(f"peft.target_modules: auto finds no linear layer in {type(model).__name__}")
        if not auto:
            check_lora_targets(model, targets, label="peft.target_modules")
        if cfg.exclude_modules is not None:
            check_lora_targets(model, cfg.exclude_modules, label="peft.exclude_modules")
        _check_modules_to_save(model, cfg.modules_to_save)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not auto:
        _warn_if_head_targeted(model, cfg)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      exclude_modules=cfg.exclude_modules, modules_to_save=cfg.modules_to_save,
                      use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=cfg.init_lora_weights,
                      bias=cfg.bias)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    if base_model is not None:
        name, revision = base_model, None
        hub = parse_hub_id(base_model)
        if hub is not None and not base_model.startswith(BUILTIN_PREFIX) and not Path(base_model).exists():
            name, revision = hub
        peft_model.peft_config["default"].base_model_name_or_path = name
        peft_model.peft_config["default"].revision = revision
    named = list(peft_model.named_parameters())
    if cfg.bias != "none" and not any(p.requires_grad and n.endswith("bias") for n, p in named):
        raise ConfigError(f"'peft.bias' is {cfg.bias!r} but {type(model).__name__} has no bias there to train; "
                          "use 'none'")
    n_train = sum(p.numel() for _, p in named if p.requires_grad)
    n_all = sum(p.numel() for _, p in named)
    n_layers = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    where = (f"auto: {', '.join(lora_target_modules(model))} in the body, output head excluded" if auto
             else f"target_modules={cfg.target_modules!r}")
    logger.info("LoRA r=%d alpha=%s on %d linear layers (%s): %d trainable of %d parameters (%.3f%%)", cfg.r,
                cfg.lora_alpha, n_layers, where, n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return peft_model


def _check_modules_to_save(model: torch.nn.Module, names: list[str] | None) -> None:
    """``ValueError`` for ``modules_to_save`` names that match no module (PEFT matches by name suffix)."""
    if not names:
        return
    keys = [k for k, _ in model.named_modules() if k]
    unmatched = [n for n in names if not any(k.endswith(n) for k in keys)]
    if unmatched:
        raise ValueError(f"peft.modules_to_save {unmatched} match no module of {type(model).__name__}")


def _warn_if_head_targeted(model: torch.nn.Module, cfg: PeftConfig) -> None:
    """Warn when user-given ``target_modules`` also select the output head (PEFT matches names by suffix)."""
    from align.models import lora_exclude_modules

    def hit(name: str, spec: list[str] | str | None) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    for head in lora_exclude_modules(model):
        if hit(head, cfg.target_modules) and not hit(head, cfg.exclude_modules) and \
                not any(head.endswith(n) for n in cfg.modules_to_save or []):
            logger.warning("peft.target_modules %r also match the output head %s, which gets an adapter too; "
                           "use 'auto', or add %r to peft.exclude_modules to leave it out",
                           cfg.target_modules, head, head)
