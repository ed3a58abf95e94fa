"""Build the model and tokenizer a recipe asks for, with an optional LoRA adapter.

``model.path`` may be a local checkpoint directory or ``builtin:<name>`` for a checkpoint shipped in the
package (``data/checkpoints/<name>``); ``model.init_config`` builds a randomly initialised native LLaDA
model instead. ``builtin:arithmetic`` as tokenizer builds the embedded word-level tokenizer.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from align.config import ConfigError, ModelConfig, PeftConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def builtin_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with the package."""
    root = resources.files("align.data") / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def resolve_model_path(path: str) -> str:
    """Turn ``builtin:<name>`` into the shipped directory; check that a local directory exists."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        root = resources.files("align.data") / "checkpoints" / name
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"no built-in checkpoint {name!r}; available: {builtin_checkpoints()}. "
                                    f"Rebuild it with: dlm-align run quickstart-pretrain")
        return str(root)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return path


def build_tokenizer(spec: str) -> Any:
    """Load a tokenizer directory, or build the embedded one for ``builtin:arithmetic``."""
    if spec == "builtin:arithmetic":
        from align.data.task import corpus_for_tokenizer
        from align.data.tokenizer import build_word_tokenizer

        return build_word_tokenizer(corpus_for_tokenizer())
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(spec))


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None) -> torch.nn.Module:
    """The model of ``cfg``: loaded from ``path`` or randomly initialised from ``init_config``."""
    from align.models import LLaDAConfig, LLaDAModelLM, load_model

    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = load_model(resolve_model_path(cfg.path), dtype=dtype, mask_token_id=cfg.mask_token_id,
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
