"""Run a recipe: check its inputs and rows, build the model, run its stages in order, evaluate after each, and
write the run report.

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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from align.build import build_model_and_tokenizer, build_tokenizer
from align.config import RecipeConfig, config_to_dict
from align.config.paths import check_paths, missing_paths_error
from align.data.formatting import DataFormatError, add_system_prompt
from align.data.loading import load_files, load_task, rl_prompt, tokenize_dataset, tokenize_prompts
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


#: rows of a built-in task that :func:`check_data` tokenises (they all come from one template).
TASK_ROWS_CHECKED = 1000


@dataclass(frozen=True)
class DataStats:
    """Rows of one stage after tokenisation: how many were read, checked and kept, and their lengths in tokens
    (``longest``: prompt + completion, or the prompt alone for ``grpo``; None when only their shape was checked)."""

    rows: int
    checked: int
    kept: int
    longest: int | None = None
    longest_prompt: int | None = None
    shortest_prompt: int | None = None


class _ShapeTokenizer:
    """Stands in for a tokenizer that is not on this machine, so that rows can be checked for their shape by the
    same code that tokenises them (one id per word, the same for the same word; the lengths mean nothing)."""

    chat_template = "shape-only"
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [zlib.crc32(w.encode()) for w in text.split()]}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return text + ("\nassistant:" if add_generation_prompt else "")


def _stage_rows(cfg: RecipeConfig, stage: str, train: Any, tokenizer: Any, source: str | None = None) -> Any:
    """``train`` tokenised as ``stage`` will tokenise it (``source`` names the rows in errors)."""
    from align.pipeline.stage import _training_rows, preference_rows

    d = cfg.data
    if stage == "vrpo":
        return preference_rows(cfg, train, tokenizer, source)
    if stage == "grpo":
        return tokenize_prompts(train, tokenizer, use_chat_template=d.use_chat_template, max_length=d.max_length,
                                source=source or ",".join(d.train_files or []) or str(d.task),
                                names=column_names(cfg), system_prompt=d.system_prompt)
    if source is not None and d.task is None:
        return tokenize_dataset(train, tokenizer, fmt=d.format, use_chat_template=d.use_chat_template,
                                max_length=d.max_length, source=source, names=column_names(cfg),
                                system_prompt=d.system_prompt)
    return _training_rows(cfg, stage, train, tokenizer)


def check_data(cfg: RecipeConfig, tokenizer: Any | None) -> tuple[Any, Any | None, dict[str, DataStats]]:
    """Read the recipe's rows and tokenise them as every stage and the evaluation will, before any model is
    loaded; return ``(train, held_out, stats per stage)``.

    Each local file is checked on its own, so an error names the file and the row
    (:class:`~align.data.formatting.DataFormatError`). Without ``tokenizer`` (not on this machine) the rows are
    checked for their shape only and the stats carry no lengths. Rows of a built-in task are generated from one
    template: the first :data:`TASK_ROWS_CHECKED` are checked.
    """
    d = cfg.data
    train, test = load_splits(cfg)
    rows_in = train if d.task is None else train.select(range(min(len(train), TASK_ROWS_CHECKED)))
    tok = tokenizer if tokenizer is not None else _ShapeTokenizer()
    shaped = dataclasses.replace(cfg, data=dataclasses.replace(d, max_length=None)) if tokenizer is None else cfg
    files = d.train_files or []
    stats: dict[str, DataStats] = {}
    for stage in cfg.stages:
        if len(files) > 1:
            for f in files:
                _stage_rows(shaped, stage, load_files([f], split_name="train"), tok, source=f)
        rows = _stage_rows(shaped, stage, rows_in, tok, source=files[0] if len(files) == 1 else None)
        if tokenizer is None:
            stats[stage] = DataStats(len(train), len(rows_in), len(rows))
            continue
        prompts = [len(p) for p in rows["prompt_ids"]]
        answers = [max(len(c), len(r)) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])] \
            if stage == "vrpo" else [len(c) for c in rows["completion_ids"]] if stage != "grpo" else [0] * len(prompts)
        total = [a + c for a, c in zip(prompts, answers)]
        stats[stage] = DataStats(len(train), len(rows_in), len(rows), max(total), max(prompts), min(prompts))
    if "vrpo" in cfg.stages and d.task is None and test is not None and cfg.stage_options("vrpo")[0].eval_pairs:
        _stage_rows(shaped, "vrpo", test, tok, source=",".join(d.eval_files or []))   # held-out preference pairs
    if cfg.eval.enabled and test is not None:
        try:
            _eval_rows(cfg, test)
        except DataFormatError as err:
            where = ",".join(d.eval_files or []) or f"task {d.task}"
            raise DataFormatError(f"{where}: {err}") from err
    return train, test, stats


def _eval_rows(cfg: RecipeConfig, test: Any) -> tuple[list[Any], list[str]]:
    """Held-out prompts (as the GRPO stage reads them, with ``data.system_prompt`` in front) and answers."""
    names = column_names(cfg)
    n = min(cfg.eval.num_problems, len(test))
    if n < cfg.eval.num_problems:
        logger.warning("held-out split has %d rows; evaluating %d instead of %d", len(test), n,
                       cfg.eval.num_problems)
    prompts, answers = [], []
    for i in range(n):
        row = test[i]
        if names.answer not in row:
            raise DataFormatError(f"held-out row {i} has no '{names.answer}' column (columns: {sorted(row)})")
        where = f"held-out row {i}"
        prompts.append(add_system_prompt(rl_prompt(row, names, where), cfg.data.system_prompt, where))
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
    """Run every stage of ``cfg`` with evaluation; return (and write) the report.

    Before any model is loaded, every input path is checked (all missing ones are named in one error) and the
    rows are read and tokenised as the stages will read them (a bad row fails naming its file and row).
    """
    error = missing_paths_error(check_paths(cfg))
    if error is not None:
        raise error
    train, test, _ = check_data(cfg, build_tokenizer(cfg.model.tokenizer or cfg.model.path))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "recipe.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    model, tokenizer = build_model_and_tokenizer(cfg.model)
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
        # "merged": false when peft.merge is off (final/ then holds the adapter, not full weights)
        entry: dict[str, Any] = {"checkpoint": str(final), "merged": cfg.peft is None or cfg.peft.merge}
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
