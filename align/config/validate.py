"""Rules across recipe sections (each section checks its own fields when it is built)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from align.config.sections import STAGE_OPTIONS, STAGES, RecipeConfig, stage_unknown_key
from align.options import ConfigError

#: TrainingArguments set by dlm-align from the recipe's top-level keys; a stage section may not set them.
MANAGED_TRAINING_ARGS = ("output_dir", "seed", "data_seed", "report_to", "run_name", "remove_unused_columns")


def training_argument_names() -> set[str]:
    """Names of the ``transformers.TrainingArguments`` fields a stage section may set."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training_arguments(stage: str, kwargs: dict[str, Any]) -> None:
    """Build ``TrainingArguments`` from a stage's keys so that bad values fail at load time."""
    from transformers import TrainingArguments

    probe = {k: v for k, v in kwargs.items() if k not in ("deepspeed", "use_cpu")}  # DeepSpeed is read at launch
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TrainingArguments(output_dir=tmp, use_cpu=True, **probe)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"'{stage}': invalid training arguments {sorted(probe)}: {exc}") from exc


def _zero_stage(ds: Any) -> int | None:
    """ZeRO stage of a DeepSpeed config (dict or JSON path); None when unset or unreadable."""
    if isinstance(ds, str):
        try:
            ds = json.loads(Path(ds).read_text())
        except (OSError, ValueError):
            return None
    if isinstance(ds, dict):
        return ds.get("zero_optimization", {}).get("stage")
    return None


def _check_stage(cfg: RecipeConfig, stage: str, ta_names: set[str]) -> None:
    section = getattr(cfg, stage)
    if section and stage not in cfg.stages:
        raise ConfigError(f"section '{stage}' is set but '{stage}' is not in 'stages' {cfg.stages}")
    opts, rest = cfg.stage_options(stage)
    for k in rest:
        if k in MANAGED_TRAINING_ARGS:
            raise ConfigError(f"'{stage}.{k}' is set by dlm-align from the recipe's top-level keys; remove it")
        if k not in ta_names:
            valid = sorted(ta_names | {f.name for f in dataclasses.fields(STAGE_OPTIONS[stage])})
            raise stage_unknown_key(stage, k, valid)
    if section and stage in cfg.stages:
        _check_training_arguments(stage, rest)
    if stage == "grpo" and stage in cfg.stages:
        bs = rest.get("per_device_train_batch_size", 8)
        if isinstance(bs, int) and bs % opts.num_generations:
            raise ConfigError(f"'grpo.per_device_train_batch_size' ({bs}) counts completions and must be a multiple "
                              f"of 'grpo.num_generations' ({opts.num_generations})")
        if cfg.data.task is None and cfg.data.format == "text":
            raise ConfigError("the 'grpo' stage needs prompts: 'data.format' cannot be 'text'")
    if stage != "grpo" and opts.random_length_prob and stage != "pretrain":
        raise ConfigError(f"'{stage}.random_length_prob' only applies to the pretrain stage")


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Check the rules that involve several sections; raise :class:`ConfigError` naming the keys."""
    if cfg.peft is not None:
        if "pretrain" in cfg.stages:
            raise ConfigError("'peft' cannot be combined with the 'pretrain' stage (LoRA on random weights)")
        for stage in cfg.stages:
            if _zero_stage(getattr(cfg, stage).get("deepspeed")) == 3:
                raise ConfigError(f"'peft' with DeepSpeed ZeRO-3 ('{stage}.deepspeed') is not supported: the adapter "
                                  "is merged at the end of the stage, which needs whole weights; use ZeRO-2")
    ta_names = training_argument_names()
    for stage in STAGES:
        _check_stage(cfg, stage, ta_names)
    if cfg.eval.enabled and cfg.data.task is None and cfg.data.eval_files is None:
        raise ConfigError("evaluation needs held-out rows: set 'data.eval_files' or use 'data.task', "
                          "or set 'eval.enabled: false'")
    return cfg
