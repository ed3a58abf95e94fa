"""Run a recipe: build the model, run its stages in order, evaluate, and write the run report.

Layout of a run directory::

    <output_dir>/recipe.yaml          the validated recipe (after overrides)
    <output_dir>/<stage>/checkpoint-N training checkpoints (resumable; ``.complete`` marks finished ones)
    <output_dir>/<stage>/final        the stage's model + tokenizer (HF format; LoRA merged if configured)
    <output_dir>/<stage>/adapter      the LoRA adapter alone (when ``peft`` is set)
    <output_dir>/eval/<stage>.jsonl   every evaluated completion
    <output_dir>/report.json          {"stages": {"base": {...}, "sft": {...}}, ...}
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from align.build import apply_lora, build_model_and_tokenizer
from align.config import RecipeConfig, config_to_dict
from align.data.collator import SFTCollator
from align.data.formatting import ColumnNames
from align.data.loading import load_files, load_task, tokenize_dataset, tokenize_prompts
from align.data.task import pretraining_texts
from align.evaluate import EvalResult, evaluate

logger = logging.getLogger(__name__)


def _names(cfg: RecipeConfig) -> ColumnNames:
    d = cfg.data
    return ColumnNames(prompt=d.prompt_column, completion=d.completion_column, messages=d.messages_column,
                       text=d.text_column, answer=d.answer_column)


def _splits(cfg: RecipeConfig) -> tuple[Any, Any | None]:
    """Raw train rows and held-out rows (or None)."""
    d = cfg.data
    if d.task is not None:
        args = dict(d.task_args)
        num_train = int(args.pop("num_train", 20000))
        num_test = int(args.pop("num_test", 500))
        seed = int(args.pop("seed", 0))
        dd = load_task(d.task, num_train=num_train, num_test=num_test, seed=seed, **args)
        return dd["train"], dd["test"]
    train = load_files(d.train_files or [], split_name="train")
    test = load_files(d.eval_files, split_name="test") if d.eval_files else None
    return train, test


def _training_rows(cfg: RecipeConfig, stage: str, train: Any, tokenizer: Any) -> Any:
    from datasets import Dataset

    d = cfg.data
    source = d.task or ",".join(d.train_files or [])
    if stage == "pretrain" and d.task is not None:
        texts = pretraining_texts(list(train))
        ds = Dataset.from_dict({d.text_column: texts})
        return tokenize_dataset(ds, tokenizer, fmt="text", use_chat_template=False, max_length=d.max_length,
                                source=f"{source} (pretraining text)", names=_names(cfg))
    return tokenize_dataset(train, tokenizer, fmt=d.format, use_chat_template=d.use_chat_template,
                            max_length=d.max_length, source=source, names=_names(cfg))


def _eval_rows(cfg: RecipeConfig, test: Any) -> tuple[list[Any], list[str]]:
    names = _names(cfg)
    n = min(cfg.eval.num_problems, len(test))
    if n < cfg.eval.num_problems:
        logger.warning("held-out split has %d rows; evaluating %d instead of %d", len(test), n,
                       cfg.eval.num_problems)
    prompts, answers = [], []
    for i in range(n):
        row = test[i]
        if names.answer not in row:
            raise KeyError(f"held-out row {i} has no '{names.answer}' column (columns: {sorted(row)})")
        if names.prompt in row:
            prompts.append(row[names.prompt])
        else:
            msgs = row[names.messages]
            prompts.append(msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs)
        answers.append(str(row[names.answer]))
    return prompts, answers


def _report_path(cfg: RecipeConfig) -> Path:
    return Path(cfg.output_dir) / "report.json"


def _load_report(cfg: RecipeConfig) -> dict[str, Any]:
    p = _report_path(cfg)
    if cfg.resume and p.is_file():
        return json.loads(p.read_text())
    return {"stages": {}}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_eval(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, test: Any) -> EvalResult:
    """Evaluate ``model`` on the held-out rows and save the completions under ``eval/<stage>.jsonl``."""
    prompts, answers = _eval_rows(cfg, test)
    res = evaluate(model, tokenizer, prompts, answers, cfg.eval, use_chat_template=cfg.data.use_chat_template,
                   seed=cfg.seed, desc=f"eval {stage}")
    if _is_main_process():
        out = Path(cfg.output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{stage}.jsonl", "w") as f:
            for r in res.samples:
                f.write(json.dumps(r) + "\n")
    return res


def train_stage(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, train: Any
                ) -> torch.nn.Module:
    """Run one SFT-style stage (``pretrain`` or ``sft``); return the trained (LoRA-merged) model."""
    from transformers import TrainingArguments

    from align.trainers.sft import DiffusionSFTTrainer, last_complete_checkpoint

    opts, ta_kwargs = cfg.stage_options(stage)
    stage_dir = Path(cfg.output_dir) / stage
    rows = _training_rows(cfg, stage, train, tokenizer)
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft)
    ta_kwargs.setdefault("logging_steps", 10)
    ta_kwargs.setdefault("save_strategy", "steps" if "save_steps" in ta_kwargs else "no")
    ta_kwargs.setdefault("disable_tqdm", False)
    ta_kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    args = TrainingArguments(output_dir=str(stage_dir), seed=cfg.seed, data_seed=cfg.seed, report_to=cfg.report_to,
                             run_name=f"{cfg.run_name or Path(cfg.output_dir).name}-{stage}",
                             remove_unused_columns=False, **ta_kwargs)
    trainer = DiffusionSFTTrainer(model=model, args=args, train_dataset=rows.select_columns(
        ["prompt_ids", "completion_ids"]), data_collator=SFTCollator(tokenizer.pad_token_id, eos_train=opts.eos_train),
        processing_class=tokenizer, mask_token_id=_mask_id(model), options=opts, seed=cfg.seed)
    resume = last_complete_checkpoint(stage_dir) if cfg.resume else None
    if resume:
        logger.info("resuming %s from %s", stage, resume)
    trainer.train(resume_from_checkpoint=resume)
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
        if _is_main_process():
            model.save_pretrained(str(tmp))
    else:
        # save_model gathers ZeRO-3 partitions and is called on every rank.
        trainer.save_model(str(tmp))
        model = trainer.model
    if _is_main_process():
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return model


class PromptCollator:
    """Left-pad tokenised prompts; pass every raw column through (rewards read them)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from align.evaluate import left_pad

        ids, att = left_pad([f["prompt_ids"] for f in features], self.pad_token_id)
        rows = [{k: v for k, v in f.items() if k not in ("prompt_ids", "completion_ids")} for f in features]
        return {"prompt_ids": ids, "prompt_mask": att, "rows": rows}


def train_grpo_stage(cfg: RecipeConfig, model: torch.nn.Module, tokenizer: Any, train: Any) -> torch.nn.Module:
    """Run the diffusion GRPO stage; return the trained (LoRA-merged) model."""
    from transformers import TrainingArguments

    from align.evaluate import stop_token_ids
    from align.rewards import RewardRunner
    from align.trainers.grpo import DiffusionGRPOTrainer
    from align.trainers.sft import last_complete_checkpoint

    opts, ta_kwargs = cfg.stage_options("grpo")
    stage_dir = Path(cfg.output_dir) / "grpo"
    d = cfg.data
    rows = tokenize_prompts(train, tokenizer, use_chat_template=d.use_chat_template, max_length=d.max_length,
                            source=d.task or ",".join(d.train_files or []), names=_names(cfg))
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft)
    # TRL counts completions in per_device_train_batch_size; the dataloader yields prompts.
    ta_kwargs["per_device_train_batch_size"] = ta_kwargs.get("per_device_train_batch_size", 8) // opts.num_generations
    ta_kwargs.setdefault("logging_steps", 10)
    ta_kwargs.setdefault("save_strategy", "steps" if "save_steps" in ta_kwargs else "no")
    ta_kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    args = TrainingArguments(output_dir=str(stage_dir), seed=cfg.seed, data_seed=cfg.seed, report_to=cfg.report_to,
                             run_name=f"{cfg.run_name or Path(cfg.output_dir).name}-grpo",
                             remove_unused_columns=False, **ta_kwargs)
    runner = RewardRunner.from_specs(opts.rewards, **opts.reward_failure)
    trainer = DiffusionGRPOTrainer(model=model, args=args, train_dataset=rows,
                                   data_collator=PromptCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                                   options=opts, reward_runner=runner, stop_ids=stop_token_ids(tokenizer),
                                   seed=cfg.seed)
    resume = last_complete_checkpoint(stage_dir) if cfg.resume else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        runner.close()
    return _save_final(cfg, trainer, tokenizer, stage_dir)


def _mask_id(model: torch.nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.mask_token_id)


def _eval_flags(cfg: RecipeConfig, stage: str) -> tuple[list[bool], list[bool]] | None:
    """Per-problem (correct, looped) flags of a stage's evaluation, or None if it has none."""
    path = Path(cfg.output_dir) / "eval" / f"{stage}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [bool(r["correct"]) for r in rows], [float(r.get("loop_fraction", 0.0)) > 0 for r in rows]


def compare_stages(cfg: RecipeConfig, report: dict[str, Any]) -> None:
    """Paired McNemar tests of each evaluated stage against the one before it (``report["comparisons"]``).

    Each entry is the accuracy test (``delta``, ``n01`` fixed, ``n10`` broken, ``p_value``) with the same
    test on the loop indicator under ``"loop_rate"`` (``delta`` = change in loop rate, ``n01`` problems
    that started looping, ``n10`` problems that stopped).
    """
    from align.stats import mcnemar_exact

    names = [s for s in report["stages"] if "accuracy" in report["stages"][s]]
    comps = report.setdefault("comparisons", {})
    for prev, cur in itertools.pairwise(names):
        a, b = _eval_flags(cfg, prev), _eval_flags(cfg, cur)
        if a is not None and b is not None and len(a[0]) == len(b[0]):
            comps[f"{cur}_vs_{prev}"] = {**mcnemar_exact(a[0], b[0]), "loop_rate": mcnemar_exact(a[1], b[1])}


def print_table(report: dict[str, Any]) -> str:
    """Format the per-stage results (and paired comparisons) as a text table (also returned)."""
    lines = [f"{'stage':<10} {'accuracy':>9} {'mean_len':>9} {'loop_rate':>10} {'problems':>9} {'nfe':>7}"]
    for name, r in report["stages"].items():
        if "accuracy" not in r:
            continue
        lines.append(f"{name:<10} {100 * r['accuracy']:>8.1f}% {r['mean_completion_length']:>9.1f} "
                     f"{100 * r.get('loop_rate', 0.0):>9.1f}% {r['num_problems']:>9d} {r.get('nfe', 0):>7d}")
    for key, c in report.get("comparisons", {}).items():
        lines.append(f"{key}: {100 * c['delta']:+.1f} points, McNemar p = {c['p_value']:.3g} "
                     f"(fixed {c['n01']}, broke {c['n10']})")
        loops = c.get("loop_rate")
        if loops and (loops["n01"] or loops["n10"]):
            lines.append(f"{key} loop rate: {100 * loops['delta']:+.1f} points, McNemar p = {loops['p_value']:.3g} "
                         f"(stopped looping {loops['n10']}, started {loops['n01']})")
    text = "\n".join(lines)
    print(text)
    return text


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Run every stage of ``cfg`` with evaluation; return (and write) the report."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        (out / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    train, test = _splits(cfg)
    report = _load_report(cfg)
    report["recipe"] = config_to_dict(cfg)
    timings = report.setdefault("seconds", {})
    if cfg.eval.enabled and cfg.eval.base and "base" not in report["stages"]:
        t0 = time.perf_counter()
        report["stages"]["base"] = run_eval(cfg, "base", model, tokenizer, test).summary()
        timings["eval_base"] = time.perf_counter() - t0
    for stage in cfg.stages:
        final = out / stage / "final"
        if cfg.resume and (final / "config.json").is_file() and stage in report["stages"]:
            logger.info("stage %s already finished in %s; loading it", stage, final)
            from align.config import ModelConfig

            mc = ModelConfig(path=str(final), dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
            model, tokenizer = build_model_and_tokenizer(mc)
            continue
        t0 = time.perf_counter()
        if stage == "grpo":
            model = train_grpo_stage(cfg, model, tokenizer, train)
        else:
            model = train_stage(cfg, stage, model, tokenizer, train)
        timings[stage] = time.perf_counter() - t0
        entry: dict[str, Any] = {"checkpoint": str(final)}
        if cfg.eval.enabled:
            t0 = time.perf_counter()
            entry.update(run_eval(cfg, stage, model, tokenizer, test).summary())
            timings[f"eval_{stage}"] = time.perf_counter() - t0
        report["stages"][stage] = entry
        if _is_main_process():
            _write_json_atomic(_report_path(cfg), report)
    if _is_main_process():
        compare_stages(cfg, report)
        _write_json_atomic(_report_path(cfg), report)
        print_table(report)
        print(f"report: {_report_path(cfg)}")
    return report
