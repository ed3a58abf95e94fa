"""Run a recipe: build the model, run its stages in order, evaluate after each, and write the run report.

Layout of a run directory::

    <output_dir>/recipe.yaml          the validated recipe (after overrides)
    <output_dir>/<stage>/checkpoint-N training checkpoints (resumable; ``.complete`` marks finished ones)
    <output_dir>/<stage>/final        the stage's model + tokenizer (HF format; LoRA merged if configured)
    <output_dir>/<stage>/adapter      the LoRA adapter alone (when ``peft`` is set)
    <output_dir>/eval/<stage>.jsonl   every evaluated completion
    <output_dir>/report.json          {"stages": {"base": {...}, "sft": {...}}, ...}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from align.build import build_model_and_tokenizer
from align.config import RecipeConfig, config_to_dict
from align.data.loading import load_files, load_task
from align.evaluate import EvalResult, evaluate
from align.pipeline.report import compare_stages, load_report, print_table, report_path, write_json_atomic
from align.pipeline.stage import column_names, is_main_process, run_stage

logger = logging.getLogger(__name__)


def load_splits(cfg: RecipeConfig) -> tuple[Any, Any | None]:
    """Raw train rows and held-out rows (or None) of the recipe's ``data`` section."""
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


def _eval_rows(cfg: RecipeConfig, test: Any) -> tuple[list[Any], list[str]]:
    names = column_names(cfg)
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


def run_eval(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, test: Any) -> EvalResult:
    """Evaluate ``model`` on the held-out rows and save the completions under ``eval/<stage>.jsonl``."""
    prompts, answers = _eval_rows(cfg, test)
    res = evaluate(model, tokenizer, prompts, answers, cfg.eval, use_chat_template=cfg.data.use_chat_template,
                   seed=cfg.seed, desc=f"eval {stage}")
    if is_main_process():
        out = Path(cfg.output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{stage}.jsonl", "w") as f:
            for r in res.samples:
                f.write(json.dumps(r) + "\n")
    return res


def run_recipe(cfg: RecipeConfig) -> dict[str, Any]:
    """Run every stage of ``cfg`` with evaluation; return (and write) the report."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    train, test = load_splits(cfg)
    report = load_report(cfg)
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
            model, tokenizer = build_model_and_tokenizer(dataclasses.replace(
                cfg.model, path=str(final), init_config=None, tokenizer=None, mask_token_id=None))
            continue
        t0 = time.perf_counter()
        model = run_stage(cfg, stage, model, tokenizer, train)
        timings[stage] = time.perf_counter() - t0
        entry: dict[str, Any] = {"checkpoint": str(final)}
        if cfg.eval.enabled:
            t0 = time.perf_counter()
            entry.update(run_eval(cfg, stage, model, tokenizer, test).summary())
            timings[f"eval_{stage}"] = time.perf_counter() - t0
        report["stages"][stage] = entry
        if is_main_process():
            write_json_atomic(report_path(cfg), report)
    if is_main_process():
        compare_stages(cfg, report)
        write_json_atomic(report_path(cfg), report)
        print_table(report)
        print(f"report: {report_path(cfg)}")
    return report
