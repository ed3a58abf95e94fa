"""Denoiser models: the native LLaDA architecture, adapters for other denoisers, resolving model names
(:mod:`align.models.resolve`: ``builtin:<name>``, a directory or a Hub id) and loading helpers."""

from align.models.adapters import (
    DENOISER_KINDS,
    Denoiser,
    DreamAdapter,
    MaskedLMAdapter,
    load_denoiser,
    load_dream,
    positions_from_mask,
    shift_right,
)
from align.models.configuration_llada import (
    LLADA_LORA_TARGETS,
    LLaDAConfig,
    check_mask_token_id,
    llada_8b_config,
    tiny_llada_config,
)
from align.models.llada import LLaDABlock, LLaDAModelLM, LLaDAPreTrainedModel
from align.models.loading import (
    check_lora_targets,
    load_model,
    load_model_and_tokenizer,
    lora_exclude_modules,
    lora_target_modules,
    read_config_dict,
)
from align.models.resolve import (
    DTYPES,
    ResolvedModel,
    builtin_checkpoints,
    builtin_tokenizers,
    hub_cache_dir,
    load_tokenizer,
    resolve_model,
    resolve_model_dir,
)

__all__ = [
    "DENOISER_KINDS",
    "DTYPES",
    "LLADA_LORA_TARGETS",
    "Denoiser",
    "DreamAdapter",
    "LLaDABlock",
    "LLaDAConfig",
    "LLaDAModelLM",
    "LLaDAPreTrainedModel",
    "MaskedLMAdapter",
    "ResolvedModel",
    "builtin_checkpoints",
    "builtin_tokenizers",
    "check_lora_targets",
    "check_mask_token_id",
    "hub_cache_dir",
    "llada_8b_config",
    "load_denoiser",
    "load_dream",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "lora_exclude_modules",
    "lora_target_modules",
    "positions_from_mask",
    "read_config_dict",
    "resolve_model",
    "resolve_model_dir",
    "shift_right",
    "tiny_llada_config",
]
