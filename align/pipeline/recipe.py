"""Run a recipe: check its inputs and rows, build the model, run its stages in order, evaluate after each, and
write the run report.

Layout of a run directory::

    <output_dir>/recipe.yaml          the validated recipe (after overrides)
    <output_dir>/<stage>/checkpoint-N training checkpoints (resumable; ``.complete`` marks finished ones)
    <output_dir>/<stage>/.staging     checkpoints being written (moved into place whole when complete)
    <output_dir>/<stage>/final        the stage's model + tokenizer (HF format; LoRA merged if configured)
    <output_dir>/<stage>/adapter      the LoRA adapter alone (when ``peft`` is set)
    <output_dir>/<stage>/log_history.json  the stage's training log (every logging step), whatever ``report_to`` says
    <output_dir>/eval/<stage>.jsonl   every evaluated completion
    <output_dir>/report.json          {"stages": {"base": {...}, "sft": {...}}, ...}
    <output_dir>/report.md            results table, paired tests, plots, the recipe (``dlm-align report`` rebuilds it)
    <output_dir>/plots/*.png          training curves per stage, accuracy and loop rate per stage
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from align.build import build_model_and_tokenizer, build_tokenizer
from align.config import RecipeConfig, config_to_dict
from align.config.paths import check_paths, missing_paths_error
from align.data.checks import (
    BadRowsError,
    RawRows,
    counts_by_kind,
    first_per_row,
    read_rows,
    rows_to_dataset,
    screen,
    settle,
)
from align.data.checks import report as bad_rows_report
from align.data.countdown import COUNTDOWN_FORMAT, countdown_rows
from align.data.formatting import DataFormatError
from align.data.loading import (
    check_rl_columns,
    encode_rl_row,
    encode_row,
    load_task,
    resolve_format,
    tokenize_prompts,
)
from align.data.preference import is_pair_problem
from align.evaluate import EvalResult, build_checker, eval_problem, eval_problems, evaluate_sharded
from align.pipeline.report import (
    compare_stages,
    load_report,
    print_table,
    report_path,
    write_json_atomic,
    write_text_atomic,
)
from align.pipeline.reruns import apply_restart, plan_rerun
from align.pipeline.stage import column_names, is_main_process, run_stage, wait_for_every_rank

logger = logging.getLogger(__name__)


def load_splits(cfg: RecipeConfig, tokenizer: Any | None = None) -> tuple[Any, Any | None]:
    """Train rows and held-out rows (or None) of the recipe's ``data`` section, as the stages read them.

    Local files are read row by row and every row is checked as :func:`check_data` checks it (for its shape only
    when ``tokenizer`` is None); bad rows are handled by ``data.bad_rows`` (strict: an error listing them; skip:
    left out). The splits of a built-in task are returned as generated."""
    if cfg.data.task is not None:
        return _task_splits(cfg)
    train, test, _ = _checked_splits(cfg, tokenizer)
    return train, test


#: rows of a built-in task that :func:`check_data` tokenises (they all come from one template).
TASK_ROWS_CHECKED = 1000


@dataclass(frozen=True)
class DataStats:
    """Rows of one stage after the checks: how many were read, checked and kept (``bad``: the rows left out, counted
    by kind), and their lengths in tokens (``longest``: prompt + completion, the prompt alone for ``grpo``, the
    prompt + the longer response for ``vrpo``; None when only their shape was checked)."""

    rows: int
    checked: int
    kept: int
    longest: int | None = None
    longest_prompt: int | None = None
    shortest_prompt: int | None = None
    bad: dict[str, int] = dataclasses.field(default_factory=dict)


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


def _stage_rows(cfg: RecipeConfig, stage: str, train: Any, tokenizer: Any) -> Any:
    """Rows of a built-in task tokenised as ``stage`` will tokenise them."""
    from align.pipeline.stage import _training_rows, preference_rows

    d = cfg.data
    if stage == "vrpo":
        return preference_rows(cfg, train, tokenizer)
    if stage == "grpo":
        return tokenize_prompts(train, tokenizer, use_chat_template=d.use_chat_template, max_length=d.max_length,
                                source=str(d.task), names=column_names(cfg), system_prompt=d.system_prompt,
                                bad_rows=d.bad_rows)
    return _training_rows(cfg, stage, train, tokenizer)


_Encoder = Callable[[Mapping[str, Any], str], tuple[Any, int]]


def _row_check(cfg: RecipeConfig, stage: str, tokenizer: Any, columns: list[str], source: str
               ) -> tuple[_Encoder, str]:
    """The per-row function of ``stage`` (the one its tokenisation uses) and what its length counts."""
    from align.data.preference import encode_preference_row

    d, names = cfg.data, column_names(cfg)
    if stage == "vrpo":
        return (lambda row, where: encode_preference_row(row, tokenizer, where, use_chat_template=d.use_chat_template,
                                                         names=names, system_prompt=d.system_prompt),
                "prompt + longer response")
    if stage == "grpo":
        check_rl_columns(columns, tokenizer, use_chat_template=d.use_chat_template, names=names, source=source)
        return (lambda row, where: encode_rl_row(row, tokenizer, where, use_chat_template=d.use_chat_template,
                                                 names=names, system_prompt=d.system_prompt,
                                                 needs_answer=names.answer in columns), "prompt")
    fmt = resolve_format(columns, tokenizer, fmt=d.format, use_chat_template=d.use_chat_template, names=names,
                         system_prompt=d.system_prompt, source=source)
    return (lambda row, where: encode_row(row, tokenizer, where, fmt=fmt, use_chat_template=d.use_chat_template,
                                          names=names, system_prompt=d.system_prompt), "prompt + completion")


def _prompt_length(stage: str, value: Any) -> int:
    return len(value[1] if stage == "grpo" else value[0])


def _read(cfg: RecipeConfig, files: list[str], split: str) -> RawRows:
    """The rows of local files; Countdown rows (``data.format: countdown``) with the ``prompt`` and ``answer`` built
    from them (:func:`align.data.countdown.countdown_rows`; a row that is not a Countdown problem is a bad row)."""
    raw = read_rows(files, split_name=split)
    return countdown_rows(raw) if cfg.data.format == COUNTDOWN_FORMAT else raw


def _checked_splits(cfg: RecipeConfig, tokenizer: Any | None
                    ) -> tuple[Any, Any | None, dict[str, DataStats]]:
    """``(train, held_out, stats per stage)`` after every row is checked (see :func:`check_data`)."""
    d = cfg.data
    tok = tokenizer if tokenizer is not None else _ShapeTokenizer()
    if d.task is not None:
        return _checked_task(cfg, tokenizer, tok)
    names = column_names(cfg)
    max_length = d.max_length if tokenizer is not None else None
    files = d.train_files or []
    raw = _read(cfg, files, "train")
    columns = list(dict.fromkeys(k for r in raw.rows for k in r))
    problems, dropped_pairs = list(raw.problems), []
    found = {}
    for stage in cfg.stages:
        encode, measured = _row_check(cfg, stage, tok, columns, ",".join(files))
        found[stage] = screen(raw.rows, raw.places, encode, max_length=max_length, measured=measured)
        if stage == "vrpo" and cfg.stage_options("vrpo")[0].bad_pairs == "drop":
            dropped_pairs += [p for p in found[stage].problems if is_pair_problem(p)]
            problems += [p for p in found[stage].problems if not is_pair_problem(p)]
        else:
            problems += found[stage].problems
    problems = first_per_row(problems)
    test, test_raw, test_problems = None, None, []
    if d.eval_files:
        test_raw = _read(cfg, d.eval_files, "test")
        test_problems = list(test_raw.problems)
        test_columns = list(dict.fromkeys(k for r in test_raw.rows for k in r))
        if "vrpo" in cfg.stages and cfg.stage_options("vrpo")[0].eval_pairs:
            encode, measured = _row_check(cfg, "vrpo", tok, test_columns, ",".join(d.eval_files))
            test_problems += screen(test_raw.rows, test_raw.places, encode, max_length=max_length,
                                    measured=measured).problems
        if cfg.eval.enabled:
            test_problems += screen(test_raw.rows, test_raw.places,
                                    lambda row, where: (_eval_row(cfg, row, names, where), 0)).problems
        test_problems = first_per_row(test_problems)
    if d.bad_rows == "strict" and (problems or test_problems):
        read = raw.read + (test_raw.read if test_raw is not None else 0)
        raise BadRowsError(",".join([*files, *(d.eval_files or [])]), [*problems, *test_problems], read)
    settle(problems, d.bad_rows, source=",".join(files), total=raw.read)
    if dropped_pairs:
        logger.warning("%s\nleft out (vrpo.bad_pairs: drop)", bad_rows_report(",".join(files), dropped_pairs,
                                                                               raw.read))
    bad = {p.index for p in [*problems, *dropped_pairs] if p.index is not None}
    kept = [i for i in range(len(raw.rows)) if i not in bad]
    if not kept:
        raise DataFormatError(f"{','.join(files)}: no usable rows (all {raw.read} rows are bad)")
    train = rows_to_dataset([raw.rows[i] for i in kept])
    if test_raw is not None:
        settle(test_problems, d.bad_rows, source=",".join(d.eval_files or []), total=test_raw.read)
        bad_test = {p.index for p in test_problems if p.index is not None}
        rows = [r for i, r in enumerate(test_raw.rows) if i not in bad_test]
        if not rows:
            raise DataFormatError(f"{','.join(d.eval_files or [])}: no usable held-out rows")
        test = rows_to_dataset(rows)
    counts = counts_by_kind([*problems, *dropped_pairs])
    stats: dict[str, DataStats] = {}
    keep = set(kept)
    for stage, f in found.items():
        if tokenizer is None:
            stats[stage] = DataStats(raw.read, raw.read, len(kept), bad=counts)
            continue
        rows = [(n, _prompt_length(stage, v)) for i, n, v in zip(f.kept, f.lengths, f.values, strict=True)
                if i in keep]
        stats[stage] = DataStats(raw.read, raw.read, len(kept), max(n for n, _ in rows), max(p for _, p in rows),
                                 min(p for _, p in rows), bad=counts)
    return train, test, stats


def _task_splits(cfg: RecipeConfig) -> tuple[Any, Any]:
    """Train and held-out rows of the recipe's built-in task."""
    d = cfg.data
    args = dict(d.task_args)
    num_train = int(args.pop("num_train", 20000))
    num_test = int(args.pop("num_test", 500))
    seed = int(args.pop("seed", 0))
    dd = load_task(d.task, num_train=num_train, num_test=num_test, seed=seed, **args)
    return dd["train"], dd["test"]


def _checked_task(cfg: RecipeConfig, tokenizer: Any | None, tok: Any
                  ) -> tuple[Any, Any | None, dict[str, DataStats]]:
    """The splits of a built-in task, the first :data:`TASK_ROWS_CHECKED` train rows tokenised as each stage will."""
    d = cfg.data
    train, test = _task_splits(cfg)
    rows_in = train.select(range(min(len(train), TASK_ROWS_CHECKED)))
    shaped = dataclasses.replace(cfg, data=dataclasses.replace(d, max_length=None)) if tokenizer is None else cfg
    stats: dict[str, DataStats] = {}
    for stage in cfg.stages:
        rows = _stage_rows(shaped, stage, rows_in, tok)
        if tokenizer is None:
            stats[stage] = DataStats(len(train), len(rows_in), len(rows))
            continue
        prompts = [len(p) for p in rows["prompt_ids"]]
        answers = [max(len(c), len(r)) for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])] \
            if stage == "vrpo" else [len(c) for c in rows["completion_ids"]] if stage != "grpo" else [0] * len(prompts)
        total = [a + c for a, c in zip(prompts, answers)]
        stats[stage] = DataStats(len(train), len(rows_in), len(rows), max(total), max(prompts), min(prompts))
    if cfg.eval.enabled:
        try:
            _eval_rows(cfg, test)
        except DataFormatError as err:
            raise DataFormatError(f"task {d.task}: {err}") from err
    return train, test, stats


def check_data(cfg: RecipeConfig, tokenizer: Any | None) -> tuple[Any, Any | None, dict[str, DataStats]]:
    """Read the recipe's rows and check every one as every stage and the evaluation will read it, before any model
    is loaded; return ``(train, held_out, stats per stage)``, without the bad rows under ``data.bad_rows: skip``.

    Local files are read row by row (:func:`align.data.checks.read_rows`): a malformed line is a bad row named with
    its file and line. Each row then goes through the per-row function of each stage (:func:`_row_check`: the one
    its tokenisation uses) and, for held-out files, the evaluation's (a prompt and an answer) and VRPO's held-out
    pairs; a row longer than ``data.max_length`` for a stage is a bad row. Every bad row is collected (one problem
    per row, the first found): under ``strict`` one :class:`~align.data.checks.BadRowsError` lists them all; under
    ``skip`` they are left out of the rows returned, which are the rows the stages train on, and counted by kind in
    the log. Without ``tokenizer`` (not on this machine) the rows are checked for their shape only and the stats
    carry no lengths. Rows of a built-in task are generated from one template: the first
    :data:`TASK_ROWS_CHECKED` are checked.
    """
    return _checked_splits(cfg, tokenizer)


def _eval_row(cfg: RecipeConfig, row: Any, names: Any, where: str) -> tuple[Any, str]:
    """The held-out prompt (as the GRPO stage reads it, with ``data.system_prompt`` in front) and answer of a row."""
    return eval_problem(row, names, where, cfg.data.system_prompt)


def _eval_rows(cfg: RecipeConfig, test: Any) -> tuple[list[Any], list[str]]:
    """Held-out prompts (as the GRPO stage reads them, with ``data.system_prompt`` in front) and answers of the
    first ``eval.num_problems`` rows (:func:`align.evaluate.eval_problems`; ``dlm-align eval`` reads them so too)."""
    return eval_problems(test, column_names(cfg), cfg.eval.num_problems, system_prompt=cfg.data.system_prompt)


def eval_checker(cfg: RecipeConfig) -> str:
    """The checker of the recipe's evaluation (:func:`align.evaluate.build_checker`): ``countdown`` for Countdown
    rows (``data.format: countdown``), else ``math_accuracy``."""
    return "countdown" if cfg.data.format == COUNTDOWN_FORMAT else "math_accuracy"


def run_eval(cfg: RecipeConfig, stage: str, model: torch.nn.Module, tokenizer: Any, test: Any) -> EvalResult:
    """Evaluate ``model`` on the held-out rows (split over the ranks under torchrun, gathered on every rank; scored by
    :func:`eval_checker`) and save the completions under ``eval/<stage>.jsonl``."""
    prompts, answers = _eval_rows(cfg, test)
    wait_for_every_rank()      # under torchrun this sets up the process group, so the problems are split over ranks
    res = evaluate_sharded(model, tokenizer, prompts, answers, cfg.eval, use_chat_template=cfg.data.use_chat_template,
                           seed=cfg.seed, desc=f"eval {stage}", checker=build_checker(eval_checker(cfg)))
    if is_main_process():
        out = Path(cfg.output_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{stage}.jsonl", "w") as f:
            for r in res.samples:
                f.write(json.dumps(r) + "\n")
    return res


def run_recipe(cfg: RecipeConfig, *, restart: bool = False, restart_from: str | None = None) -> dict[str, Any]:
    """Run every stage of ``cfg`` with evaluation; return (and write) the report.

    Before any model is loaded, every input path is checked (all missing ones are named in one error) and the
    rows are read and tokenised as the stages will read them (a bad row fails naming its file and row).
    Before anything is written, ``cfg`` is compared with the recipe stored in ``output_dir``: a finished or partly
    trained stage is reused only when the keys it depends on are unchanged, else
    :class:`~align.pipeline.reruns.RerunConflict` names them. ``restart`` deletes the run's earlier results and
    ``restart_from`` those of that stage and the stages after it (:mod:`align.pipeline.reruns`).
    """
    error = missing_paths_error(check_paths(cfg))
    if error is not None:
        raise error
    plan = plan_rerun(cfg, restart=restart, restart_from=restart_from)
    train, test, _ = check_data(cfg, build_tokenizer(cfg.model.tokenizer or cfg.model.path))
    out = Path(cfg.output_dir)
    if plan.remove:
        wait_for_every_rank()                 # every rank has read the directory before anything is deleted
        if is_main_process():
            apply_restart(plan, cfg)
        wait_for_every_rank()
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_text_atomic(out / "recipe.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    model, tokenizer = build_model_and_tokenizer(cfg.model, seed=cfg.seed)
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
        model, ran_on = run_stage(cfg, stage, model, tokenizer, train)
        timings[stage] = time.perf_counter() - t0
        # "merged": false when peft.merge is off (final/ then holds the adapter, not full weights)
        entry: dict[str, Any] = {"checkpoint": str(final), "merged": cfg.peft is None or cfg.peft.merge, **ran_on}
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
        _write_markdown_report(out)
    return report


def _write_markdown_report(out: Path) -> None:
    """Write ``report.md`` and its plots; a failure there is logged, not raised (``report.json`` is written, and
    ``dlm-align report`` builds them again from the run directory)."""
    from align.pipeline.report import write_report_md

    try:
        print(f"report with plots: {write_report_md(out)}")
    except Exception:  # the run's results are saved; only their presentation failed
        logger.exception("could not write %s; rebuild it with: dlm-align report %s", out / "report.md", out)
