"""Running one training stage of a recipe: its rows, its ``TrainingArguments``, its trainer, its final save.

Every stage gets its ``TrainingArguments`` from :func:`training_arguments`; ``pretrain`` and ``sft`` run
:class:`~align.trainers.sft.DiffusionSFTTrainer`, ``grpo`` runs :class:`~align.trainers.grpo.DiffusionGRPOTrainer`,
``vrpo`` runs :class:`~align.trainers.vrpo.DiffusionVRPOTrainer` on preference pairs (:func:`preference_rows`).
A stage ends by writing ``<stage>/final`` (and ``<stage>/adapter`` under LoRA) and returns the model that
evaluation and the next stage continue with. Its training log is kept in ``<stage>/log_history.json`` at every
logging step (:class:`~align.pipeline.history.LogHistoryWriter`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from align.build import apply_lora, build_model_and_tokenizer
from align.config import STAGES, RecipeConfig
from align.data.collator import PromptCollator, SFTCollator
from align.data.formatting import ColumnNames
from align.data.loading import tokenize_dataset, tokenize_prompts
from align.data.task import pretraining_texts
from align.options import ConfigError
from align.pipeline.history import LogHistoryWriter
from align.pipeline.ranks import agreed_digest, is_sharded, parallel_layout
from align.pipeline.report import load_report
from align.rng import derive_seed
from align.trainers.checkpoints import (
    STAGING_DIR,
    StopOnSigterm,
    TrainingStopped,
    discard,
    fsync_dir,
    fsync_tree,
    resume_checkpoint,
)

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


def wait_for_every_rank() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): a barrier across the ranks (it sets up the process group if
    needed); a single process returns at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


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
    if stage in ("grpo", "vrpo"):
        # these score completions with the output head outside the model's forward (align.likelihood.score_plan):
        # DDP's search for unused parameters would count the head as unused and reduce its gradient twice
        kwargs.setdefault("ddp_find_unused_parameters", False)
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
                                source=f"{_data_source(cfg)} (pretraining text)", names=column_names(cfg),
                                bad_rows=d.bad_rows)
    return tokenize_dataset(train, tokenizer, fmt=d.format, use_chat_template=d.use_chat_template,
                            max_length=d.max_length, source=_data_source(cfg), names=column_names(cfg),
                            system_prompt=d.system_prompt, bad_rows=d.bad_rows)


def preference_rows(cfg: RecipeConfig, rows: Any, tokenizer: Any, source: str | None = None, *,
                    held_out: bool = False) -> Any:
    """Tokenised preference pairs of the ``vrpo`` stage: ``rows`` in TRL's preference format, or, with a built-in
    task, pairs made from its rows (``vrpo.task_rejected``; seeded by the task's seed, held-out pairs apart)."""
    from align.data.preference import task_preference_pairs, tokenize_preferences
    from align.data.task import ArithmeticTaskSpec

    d, opts = cfg.data, cfg.stage_options("vrpo")[0]
    if d.task is not None:
        seed = derive_seed(int(d.task_args.get("seed", 0)), 0x50414952, int(held_out))
        rows = task_preference_pairs(rows, seed=seed, rejected=opts.task_rejected or "mixed",
                                     loop_repeats=int(d.task_args.get("loop_repeats", ArithmeticTaskSpec.loop_repeats)))
    where = source or (",".join(d.eval_files or []) if held_out and d.task is None else _data_source(cfg))
    return tokenize_preferences(rows, tokenizer, use_chat_template=d.use_chat_template, max_length=d.max_length,
                                source=where + (" (held-out pairs)" if held_out and d.task is not None else ""),
                                names=column_names(cfg), system_prompt=d.system_prompt, bad_pairs=opts.bad_pairs,
                                bad_rows=d.bad_rows)


def _held_out_pairs(cfg: RecipeConfig, tokenizer: Any, count: int) -> Any:
    """The first ``count`` held-out preference pairs (the task's held-out split, or ``data.eval_files``)."""
    from align.pipeline.recipe import load_splits

    test = load_splits(cfg)[1]
    if cfg.data.task is not None:
        test = test.select(range(min(count, len(test))))
    pairs = preference_rows(cfg, test, tokenizer, held_out=True)
    return pairs.select(range(min(count, len(pairs))))


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
                                source=_data_source(cfg), names=column_names(cfg), system_prompt=d.system_prompt)
        runner = RewardRunner.from_specs(opts.rewards, **opts.reward_failure)
        trainer = DiffusionGRPOTrainer(model=model, args=args, train_dataset=rows,
                                       data_collator=PromptCollator(tokenizer.pad_token_id),
                                       processing_class=tokenizer, options=opts, reward_runner=runner,
                                       stop_ids=stop_token_ids(tokenizer), seed=cfg.seed)
        return trainer, runner
    if stage == "vrpo":
        from align.data.preference import PAIR_COLUMNS, PreferenceCollator
        from align.trainers.vrpo import DiffusionVRPOTrainer

        rows = preference_rows(cfg, train, tokenizer)
        held_out = _held_out_pairs(cfg, tokenizer, opts.eval_pairs) if opts.eval_pairs else None
        trainer = DiffusionVRPOTrainer(model=model, args=args, train_dataset=rows.select_columns(list(PAIR_COLUMNS)),
                                       data_collator=PreferenceCollator(tokenizer.pad_token_id),
                                       processing_class=tokenizer, options=opts, seed=cfg.seed, held_out=held_out)
        return trainer, None
    from align.trainers.sft import DiffusionSFTTrainer

    rows = _training_rows(cfg, stage, train, tokenizer)
    trainer = DiffusionSFTTrainer(model=model, args=args, train_dataset=rows.select_columns(
        ["prompt_ids", "completion_ids"]), data_collator=SFTCollator(tokenizer.pad_token_id, eos_train=opts.eos_train),
        processing_class=tokenizer, mask_token_id=_mask_id(model), options=opts, seed=cfg.seed)
    return trainer, None


def run_stage(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, train: Any
              ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``stage`` (resuming from its newest complete checkpoint); return the model to continue with and what
    the stage ran on (``{"processes", "backend", "weights_digest"}``: :mod:`align.pipeline.ranks`).

    SIGTERM during training saves a complete checkpoint at the next step boundary and raises
    :class:`~align.trainers.checkpoints.TrainingStopped` (no ``final`` is written); the same run resumes from it.

    That model is the trained model without ``peft``, the merged model with ``peft.merge: true``, and the model
    with its adapter (PEFT-wrapped) with ``peft.merge: false``. In that last case a stage that already finished
    (``<stage>/final`` holds its adapter and the run report has its results) is not trained again: its adapter is
    loaded, as :func:`~align.pipeline.recipe.run_recipe` loads a finished stage's merged ``final``.

    Under ZeRO-3 and FSDP, where each rank ends with a shard of the weights, every rank then loads the whole model
    from ``final``, so that evaluation and the next stage start from whole weights on every rank. Every rank's
    weights are compared at the end (:func:`~align.pipeline.ranks.agreed_digest`): a rank that drifted stops the
    run.
    """
    stage_dir = Path(cfg.output_dir) / stage
    if cfg.peft is not None:
        done = stage_dir / "final" / "adapter_config.json"
        if not cfg.peft.merge and cfg.resume and done.is_file() and stage in load_report(cfg)["stages"]:
            model = _load_stage_adapter(model, done.parent)
            return model, {"weights_digest": agreed_digest(model, stage)}
        # The adapter's initial weights come from their own stream: (seed, 'LoRA' in ASCII, stage number).
        model = apply_lora(model, cfg.peft, base_model=_lora_base(cfg, model),
                           seed=derive_seed(cfg.seed, 0x4C6F5241, STAGES.index(stage)))
    trainer, runner = _build_trainer(cfg, stage, model, tokenizer, train)
    layout = parallel_layout(trainer)
    if cfg.peft is not None and getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(f"'peft' with FSDP (stage {stage}) is not supported: merging the adapter needs whole "
                          "weights; use DDP or ZeRO-2 with LoRA")
    newest = resume_checkpoint(stage_dir, clean=is_main_process())    # names and clears torn checkpoints
    resume = newest if cfg.resume else None
    if resume:
        logger.info("resuming %s from %s", stage, resume)
    trainer.add_callback(LogHistoryWriter(stage_dir))     # <stage>/log_history.json, whatever report_to says
    sigterm = StopOnSigterm()
    trainer.add_callback(sigterm)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        sigterm.restore()
        if runner is not None:
            runner.close()
    if sigterm.stopped_at is not None:
        ckpt = stage_dir / f"checkpoint-{sigterm.stopped_at}"
        raise TrainingStopped(sigterm.stopped_at, str(ckpt) if ckpt.is_dir() else None)
    model = _save_final(cfg, trainer, tokenizer, stage_dir)
    if is_sharded(layout):
        del trainer
        wait_for_every_rank()                       # final is in place
        if layout["backend"] == "zero3":
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()             # else from_pretrained would partition the weights again
        model, _ = build_model_and_tokenizer(dataclasses.replace(
            cfg.model, path=str((stage_dir / "final").resolve()), init_config=None, tokenizer=None,
            mask_token_id=None))
    return model, {**layout, "weights_digest": agreed_digest(model, stage)}


def _lora_base(cfg: RecipeConfig, model: torch.nn.Module) -> str | None:
    """The spec of the model a stage's adapter applies to: an earlier stage's ``final`` of this run (absolute
    path), else ``model.path`` as written (``builtin:``, Hub id; a local directory made absolute); None for a
    randomly initialised model."""
    from align.models.resolve import BUILTIN_PREFIX

    name = getattr(model, "name_or_path", None) or ""
    if name and Path(name).expanduser().resolve().is_relative_to(Path(cfg.output_dir).resolve()):
        return str(Path(name).expanduser().resolve())
    spec = cfg.model.path
    if spec is None or spec.startswith(BUILTIN_PREFIX) or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def _load_stage_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``model`` with the saved adapter of a finished ``peft.merge: false`` stage (trainable, for a later stage)."""
    from peft import PeftModel

    logger.info("stage already finished; loading its adapter from %s", adapter_dir)
    if hasattr(model, "peft_config"):  # the adapter of the stage before, continued: load the newer weights
        model.load_adapter(str(adapter_dir), adapter_name="default", is_trainable=True)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def _finish_loggers(cfg: RecipeConfig) -> None:
    """Close the stage's wandb run, so its files are complete and the next stage starts a run of its own."""
    if "wandb" in cfg.report_to or "all" in cfg.report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _save_final(cfg: RecipeConfig, trainer: Any, tokenizer: Any, stage_dir: Path) -> torch.nn.Module:
    """Write ``<stage>/final`` (and ``<stage>/adapter`` under LoRA); return the model to continue with.

    Under LoRA the adapter is saved alone first (``<stage>/adapter``, with the tokenizer). With ``peft.merge: true``
    it is then merged and ``final`` holds the merged model; with ``peft.merge: false`` nothing is merged, ``final``
    holds a copy of the adapter (no model weights) and the returned model keeps its adapter.
    """
    _finish_loggers(cfg)
    final, tmp = stage_dir / "final", stage_dir / "final.tmp"
    if cfg.peft is not None:
        adapter = stage_dir / "adapter"
        trainer.save_model(str(adapter))
        if cfg.peft.merge:
            model = trainer.model.merge_and_unload()
            if is_main_process():
                model.save_pretrained(str(tmp))
            model.name_or_path = str(final.resolve())  # what a later stage's adapter will name as its base
        else:
            model = trainer.model
            if is_main_process():
                if tmp.exists():
                    shutil.rmtree(tmp)
                shutil.copytree(adapter, tmp)
    else:
        # save_model gathers ZeRO-3 partitions and is called on every rank.
        trainer.save_model(str(tmp))
        model = trainer.model
    if is_main_process():
        tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)                    # on disk before it is moved into place: a final is never torn
        if final.exists():
            discard(final, stage_dir / STAGING_DIR)
        os.replace(tmp, final)
        fsync_dir(stage_dir)
    return model
