"""Typed recipe configuration, validated when it is loaded.

A recipe is a YAML file whose sections map onto dataclasses that check their own fields
(:mod:`align.config.sections`; the stage options live beside their trainers in :mod:`align.trainers`).
Loading (:mod:`align.config.loading`) applies ``key.sub=value`` overrides to the raw YAML, builds the
sections (:mod:`align.config.schema`: unknown keys with the closest valid one, wrong types, renamed keys),
then checks the rules across sections (:mod:`align.config.validate`), before any model is built.

Training stages (``pretrain``, ``sft``) take the fields of
:class:`~align.trainers.sft_config.DiffusionSFTOptions` plus any field of
:class:`transformers.TrainingArguments` by its own name (``learning_rate``, ``max_steps``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``deepspeed``, ...); ``grpo`` takes
:class:`~align.trainers.grpo_config.GRPOOptions` plus TrainingArguments fields; anything else is rejected.
"""

from align.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    load_recipe_dict,
    parse_override,
)
from align.config.schema import RENAMED_KEYS, yaml_load
from align.config.sections import (
    REPORT_TO,
    STAGE_OPTIONS,
    STAGES,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PeftConfig,
    RecipeConfig,
)
from align.config.validate import validate
from align.options import ConfigError, FieldError

__all__ = [
    "RENAMED_KEYS",
    "REPORT_TO",
    "STAGES",
    "STAGE_OPTIONS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FieldError",
    "ModelConfig",
    "PeftConfig",
    "RecipeConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_recipe_dict",
    "parse_override",
    "validate",
    "yaml_load",
]
