"""Build the model and tokenizer a recipe asks for, with an optional LoRA adapter.

``model.path`` and ``model.tokenizer`` are resolved by :mod:`align.models.resolve` (the one place that
turns a name into a directory): ``builtin:<name>`` for a checkpoint shipped in the package
(``data/checkpoints/<name>``), a local checkpoint directory, or a Hugging Face Hub id
``org/name[@revision]`` (from the local cache when ``HF_HUB_OFFLINE=1``). ``model.init_config`` builds
a randomly initialised native LLaDA model instead. ``builtin:arithmetic`` as tokenizer builds the
embedded word-level tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from align.config import ConfigError, ModelConfig, PeftConfig
from align.models.resolve import DTYPES
from align.models.resolve import load_tokenizer as build_tokenizer

__all__ = ["apply_lora", "build_model", "build_model_and_tokenizer", "build_tokenizer"]

logger = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None) -> torch.nn.Module:
    """The model of ``cfg``: loaded from ``path`` or randomly initialised from ``init_config``."""
    from align.models import LLaDAConfig, LLaDAModelLM, load_model

    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = load_model(cfg.path, dtype=dtype, mask_token_id=cfg.mask_token_id,
                           attn_implementation=cfg.attn_implementation)
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
        model = LLaDAModelLM(config).to(dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def build_model_and_tokenizer(cfg: ModelConfig) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer of a recipe's ``model`` section; checks that their special ids agree."""
    tok_spec = cfg.tokenizer or cfg.path
    if tok_spec is None:
        raise ConfigError("'model.tokenizer' is required when 'model.path' is not set")
    tokenizer = build_tokenizer(tok_spec)
    model = build_model(cfg, vocab_size=len(tokenizer))
    if tokenizer.mask_token_id is not None and cfg.mask_token_id is None and \
            tokenizer.mask_token_id != model.mask_token_id:
        logger.warning("tokenizer mask token id %s differs from the model's %s; the model's is used",
                       tokenizer.mask_token_id, model.mask_token_id)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model, tokenizer


def apply_lora(model: torch.nn.Module, cfg: PeftConfig) -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter (peft); target names that match no module are an error."""
    from peft import LoraConfig, get_peft_model

    from align.models import check_lora_targets, lora_target_modules

    targets = lora_target_modules(model) if cfg.target_modules == "auto" else list(cfg.target_modules)
    check_lora_targets(model, targets)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none")
    peft_model = get_peft_model(model, lora)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d on %s: %d trainable of %d parameters", cfg.r, targets, n_train, n_all)
    return peft_model
