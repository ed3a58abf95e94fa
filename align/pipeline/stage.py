"""Running one training stage of a recipe: its rows, its ``TrainingArguments``, its trainer, its final save.

Every stage gets its ``TrainingArguments`` from :func:`training_arguments`; ``pretrain`` and ``sft`` run
:class:`~align.trainers.sft.DiffusionSFTTrainer`, ``grpo`` runs :class:`~align.trainers.grpo.DiffusionGRPOTrainer`.
A stage ends by writing ``<stage>/final`` (and ``<stage>/adapter`` under LoRA) and returns the model that
evaluation and the next stage continue with.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from align.build import apply_lora
from align.config import RecipeConfig
from align.data.collator import PromptCollator, SFTCollator
from align.data.formatting import ColumnNames
from align.data.loading import tokenize_dataset, tokenize_prompts
from align.data.task import pretraining_texts
from align.trainers.sft import last_complete_checkpoint

logger = logging.getLogger(__name__)


def column_names(cfg: RecipeConfig) -> ColumnNames:
    """The column names of the recipe's ``data`` section."""
    d = cfg.data
    return ColumnNames(prompt=d.prompt_column, completion=d.completion_column, messages=d.messages_column,
                       text=d.text_column, answer=d.answer_column)


def _data_source(cfg: RecipeConfig) -> str:
    return cfg.data.task or ",".join(cfg.data.train_files or [])


def is_main_process() -> bool:
    """Whether this is rank 0 (or a single-process run)."""
    return int(os.environ.get("RANK", "0")) == 0


def training_arguments(cfg: RecipeConfig, stage: str, ta_kwargs: dict[str, Any]) -> Any:
    """The ``TrainingArguments`` of ``stage``: the section's TrainingArguments keys, the keys dlm-align manages
    (output directory, seeds, loggers, run name), and defaults a user may override (log every 10 steps, save
    only when ``save_steps`` is set, the CPU when no GPU is present)."""
    from transformers import TrainingArguments

    kwargs = dict(ta_kwargs)
    kwargs.setdefault("logging_steps", 10)
    kwargs.setdefault("save_strategy", "steps" if "save_steps" in kwargs else "no")
    kwargs.setdefault("disable_tqdm", False)
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    return TrainingArguments(output_dir=str(Path(cfg.output_dir) / stage), seed=cfg.seed, data_seed=cfg.seed,
                             report_to=cfg.report_to, run_name=f"{cfg.run_name or Path(cfg.output_dir).name}-{stage}",
                             remove_unused_columns=False, **kwargs)


def _training_rows(cfg: RecipeConfig, stage: str, train: Any, tokenizer: Any) -> Any:
    from datasets import Dataset

    d = cfg.data
    if stage == "pretrain" and d.task is not None:
        texts = pretraining_texts(list(train))
        ds = Dataset.from_dict({d.text_column: texts})
        return tokenize_dataset(ds, tokenizer, fmt="text", use_chat_template=False, max_length=d.max_length,
                                source=f"{_data_source(cfg)} (pretraining text)", names=column_names(cfg))
    return tokenize_dataset(train, tokenizer, fmt=d.format, use_chat_template=d.use_chat_template,
                            max_length=d.max_length, source=_data_source(cfg), names=column_names(cfg))


def _mask_id(model: torch.nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.mask_token_id)


def _build_trainer(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, train: Any
                   ) -> tuple[Any, Any]:
    """The trainer of ``stage`` and the resources to close after training (the reward runner, or None)."""
    opts, ta_kwargs = cfg.stage_options(stage)
    args = training_arguments(cfg, stage, ta_kwargs)
    if stage == "grpo":
        from align.evaluate import stop_token_ids
        from align.rewards import RewardRunner
        from align.trainers.grpo import DiffusionGRPOTrainer

        d = cfg.data
        rows = tokenize_prompts(train, tokenizer, use_chat_template=d.use_chat_template, max_length=d.max_length,
                                source=_data_source(cfg), names=column_names(cfg))
        runner = RewardRunner.from_specs(opts.rewards, **opts.reward_failure)
        trainer = DiffusionGRPOTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=PromptCollator(tokenizer.pad_token_id),
                                       processing_class=tokenizer, options=opts, reward_runner=runner,
                                       stop_ids=stop_token_ids(tokenizer), seed=cfg.seed)
        return trainer, runner
    from align.trainers.sft import DiffusionSFTTrainer

    rows = _training_rows(cfg, stage, train, tokenizer)
    trainer = DiffusionSFTTrainer(model=model, args=args, train_dataset=rows.select_columns(
        ["prompt_ids", "completion_ids"]), data_collator=SFTCollator(tokenizer.pad_token_id, eos_train=opts.eos_train),
        processing_class=tokenizer, mask_token_id=_mask_id(model), options=opts, seed=cfg.seed)
    return trainer, None


def run_stage(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, train: Any
              ) -> torch.nn.Module:
    """Train ``stage`` (resuming from its newest complete checkpoint); return the (LoRA-merged) model."""
    stage_dir = Path(cfg.output_dir) / stage
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft)
    trainer, runner = _build_trainer(cfg, stage, model, tokenizer, train)
    resume = last_complete_checkpoint(stage_dir) if cfg.resume else None
    if resume:
        logger.info("resuming %s from %s", stage, resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if runner is not None:
            runner.close()
    return _save_final(cfg, trainer, tokenizer, stage_dir)


def _finish_loggers(cfg: RecipeConfig) -> None:
    """Close the stage's wandb run, so its files are complete and the next stage starts a run of its own."""
    if "wandb" in cfg.report_to or "all" in cfg.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _save_final(cfg: RecipeConfig, trainer: Any, tokenizer: Any, stage_dir: Path) -> torch.nn.Module:
    """Write ``<stage>/final`` (and ``<stage>/adapter`` under LoRA); return the model to continue with."""
    _finish_loggers(cfg)
    final, tmp = stage_dir / "final", stage_dir / "final.tmp"
    if cfg.peft is not None:
        # Ship the adapter alone, then merge it so that evaluation and later stages use plain weights.
        trainer.save_model(str(stage_dir / "adapter"))
        model = trainer.model.merge_and_unload()
        if is_main_process():
            model.save_pretrained(str(tmp))
    else:
        # save_model gathers ZeRO-3 partitions and is called on every rank.
        trainer.save_model(str(tmp))
        model = trainer.model
    if is_main_process():
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return model
