"""Rules across recipe sections (each section checks its own fields when it is built)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from align.config.paths import STAGE_PATH_KEYS
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

    # DeepSpeed is read at launch; configuration files that do not exist are reported by the path checks
    probe = {k: v for k, v in kwargs.items() if k not in ("deepspeed", "use_cpu")
             and not (k in STAGE_PATH_KEYS and isinstance(v, str) and not Path(v).is_file())}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TrainingArguments(output_dir=tmp, use_cpu=True, **probe)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"'{stage}': invalid training arguments {sorted(probe)}: {exc}") from exc


#: TrainingArguments counts that TrainingArguments accepts at 0 but training cannot start with.
POSITIVE_TRAINING_COUNTS = ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")


def _check_training_numbers(stage: str, kwargs: dict[str, Any]) -> None:
    """Values ``TrainingArguments`` accepts but training fails on after the model is loaded (a batch of 0, a
    negative learning rate, no step at all)."""
    for key in POSITIVE_TRAINING_COUNTS:
        value = kwargs.get(key, 1)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"'{stage}.{key}' must be >= 1, got {value}")
    lr = kwargs.get("learning_rate", 0.0)
    if isinstance(lr, (int, float)) and not lr >= 0:
        raise ConfigError(f"'{stage}.learning_rate' must be >= 0, got {lr}")
    steps, epochs = kwargs.get("max_steps", -1), kwargs.get("num_train_epochs", 3.0)
    if isinstance(steps, int) and steps <= 0 and isinstance(epochs, (int, float)) and epochs <= 0:
        raise ConfigError(f"'{stage}' would train no step: set '{stage}.max_steps' > 0 or '{stage}.num_train_epochs' "
                          f"> 0 (got max_steps {steps}, num_train_epochs {epochs})")


def _check_task_rows(cfg: RecipeConfig) -> None:
    """A built-in task split of 0 rows leaves the stages nothing to train on, or evaluation nothing to score."""
    d = cfg.data
    if d.task is None:
        return
    if int(d.task_args.get("num_train", 1)) < 1:
        raise ConfigError(f"'data.task_args.num_train' must be >= 1: stages {cfg.stages} need training rows, got "
                          f"{d.task_args['num_train']}")
    needs_test = cfg.eval.enabled or ("vrpo" in cfg.stages and cfg.stage_options("vrpo")[0].eval_pairs)
    if needs_test and int(d.task_args.get("num_test", 1)) < 1:
        raise ConfigError(f"'data.task_args.num_test' is {d.task_args['num_test']}, but evaluation (or "
                          "'vrpo.eval_pairs') needs held-out rows; raise it or set 'eval.enabled: false'")


def zero_stage(ds: Any) -> int | None:
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
    if stage in cfg.stages:
        _check_training_numbers(stage, rest)
    if stage == "grpo" and stage in cfg.stages:
        bs = rest.get("per_device_train_batch_size", 8)
        if isinstance(bs, int) and bs % opts.num_generations:
            raise ConfigError(f"'grpo.per_device_train_batch_size' ({bs}) counts completions and must be a multiple "
                              f"of 'grpo.num_generations' ({opts.num_generations})")
        if cfg.data.task is None and cfg.data.format == "text":
            raise ConfigError("the 'grpo' stage needs prompts: 'data.format' cannot be 'text'")
    if stage in ("pretrain", "sft") and stage in cfg.stages and cfg.data.format == "countdown":
        raise ConfigError(f"the '{stage}' stage trains on completions, and Countdown rows ('data.format: countdown') "
                          "have none (only the numbers and the target); only 'grpo' trains on them")
    if stage == "sft" and opts.random_length_prob:
        raise ConfigError(f"'{stage}.random_length_prob' only applies to the pretrain stage")
    if stage == "vrpo" and stage in cfg.stages:
        _check_vrpo(cfg, opts)


def _check_vrpo(cfg: RecipeConfig, opts: Any) -> None:
    """The ``vrpo`` stage reads preference pairs: made from the built-in task, or rows of ``data.train_files`` in
    TRL's preference format (``prompt``/``chosen``/``rejected``, recognised by their columns)."""
    d = cfg.data
    if d.task is None:
        if d.format != "auto":
            raise ConfigError(f"the 'vrpo' stage reads preference rows ('chosen' and 'rejected' columns, recognised by "
                              f"name), so 'data.format' must be 'auto', got {d.format!r}")
        if opts.task_rejected is not None:
            raise ConfigError("'vrpo.task_rejected' applies to pairs made from the built-in task ('data.task'); "
                              "with 'data.train_files' the rows bring their own rejected responses")
        if opts.eval_pairs and not d.eval_files:
            raise ConfigError("'vrpo.eval_pairs' needs held-out preference rows: set 'data.eval_files' (prompt, "
                              "chosen, rejected) or 'vrpo.eval_pairs: 0'")


def _check_adapter(cfg: RecipeConfig) -> None:
    """Block KV caches need a model with KV-context support (LLaDA); Dream and masked-LM adapters have none.

    The kind comes from ``model.adapter``, or for ``auto`` from the checkpoint's ``config.json`` when it is on
    this machine (nothing is downloaded; otherwise the sampler rejects the cache when it first runs).
    """
    from align.models.adapters import KV_CONTEXT_KINDS, detect_denoiser_kind

    if cfg.model.path is None:
        return
    kind = detect_denoiser_kind(cfg.model.path, cfg.model.adapter)
    if kind is None or kind in KV_CONTEXT_KINDS:
        return
    cached = []
    if cfg.eval.enabled and cfg.eval.cache is not None:
        cached.append("'eval.cache'")
    if "grpo" in cfg.stages and cfg.stage_options("grpo")[0].cache is not None:
        cached.append("'grpo.cache'")
    if cached:
        raise ConfigError(f"{' and '.join(cached)}: block KV caches need KV-context support, which {cfg.model.path} "
                          f"loaded as {kind} ('model.adapter': {cfg.model.adapter}) does not have; set to null")


def validate(cfg: RecipeConfig) -> RecipeConfig:
    """Check the rules that involve several sections; raise :class:`ConfigError` naming the keys."""
    if cfg.peft is not None:
        if "pretrain" in cfg.stages:
            raise ConfigError("'peft' cannot be combined with the 'pretrain' stage (LoRA on random weights)")
        for stage in cfg.stages:
            if zero_stage(getattr(cfg, stage).get("deepspeed")) == 3:
                raise ConfigError(f"'peft' with DeepSpeed ZeRO-3 ('{stage}.deepspeed') is not supported: merging the "
                                  "adapter needs whole weights, and saving an adapter alone from ZeRO-3 shards is "
                                  "not tested; use ZeRO-2")
    ta_names = training_argument_names()
    for stage in STAGES:
        _check_stage(cfg, stage, ta_names)
    _check_adapter(cfg)
    _check_task_rows(cfg)
    if cfg.eval.enabled and cfg.data.task is None and cfg.data.eval_files is None:
        raise ConfigError("evaluation needs held-out rows: set 'data.eval_files' or use 'data.task', "
                          "or set 'eval.enabled: false'")
    return cfg
