"""What ``dlm-align eval`` evaluates: problems from a recipe, a run, the built-in task or a local file in a known
format (GSM8K, MATH, Countdown, plain), with few-shot examples, and the record of where they came from."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``--format`` values of ``--data`` files.
DATA_FORMATS = ("plain", "gsm8k", "math", "countdown")


#: Column presets of each format: (prompt column, answer column, default checker).
FORMAT_PRESETS = {"plain": ("prompt", "answer", "math_accuracy"), "gsm8k": ("question", "answer", "math_accuracy"),
                  "math": ("problem", "solution", "math_accuracy"), "countdown": (None, None, "countdown")}


class EvalUsageError(ValueError):
    """Flags that do not fit together (no task, two tasks, shots without examples, ...)."""


@dataclass
class Problems:
    """The problems of one evaluation and the record of where they came from."""

    prompts: list[Any]
    answers: list[str]
    record: dict[str, Any]
    use_chat_template: bool = True
    checker: str = "math_accuracy"
    shots: dict[str, Any] = field(default_factory=lambda: {"n": 0})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_recipe(args: argparse.Namespace) -> tuple[Any, str] | None:
    """The recipe the task flags name (``--run``, ``--recipe``, ``--task``), and its path."""
    from align.config import load_config
    from align.recipes import recipe_path

    if args.run:
        path = Path(args.run) / "recipe.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"--run {args.run}: no recipe.yaml (not a run directory of dlm-align run)")
        return load_config(path), str(path)
    if args.recipe:
        path = recipe_path(args.recipe)
        return load_config(path), str(path)
    if args.task:
        name = args.task.removeprefix("builtin:")
        from align.data.loading import BUILTIN_TASKS

        if not args.task.startswith("builtin:") or name not in BUILTIN_TASKS:
            raise EvalUsageError(f"--task {args.task}: expected one of "
                                 f"{', '.join('builtin:' + t for t in BUILTIN_TASKS)}")
        path = recipe_path("quickstart")
        cfg = load_config(path)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=name)), str(path)
    return None


def _shot_pair(row: Any, names: Any, where: str) -> tuple[str, str]:
    """``(question, worked solution)`` of a few-shot row: its prompt (the last user message of a conversation) and
    its ``completion`` column, else its answer column."""
    from align.data.formatting import DataFormatError
    from align.data.loading import rl_prompt

    prompt = rl_prompt(row, names, where)
    question = prompt if isinstance(prompt, str) else [m for m in prompt if m["role"] == "user"][-1]["content"]
    for col in (names.completion, names.answer):
        if isinstance(row.get(col), str | int | float) and str(row[col]).strip():
            return question, str(row[col])
    raise DataFormatError(f"{where}: a few-shot example needs a '{names.completion}' or '{names.answer}' column")


def _shots(rows: Any, n: int, names: Any, source: str) -> list[tuple[str, str]]:
    if n > len(rows):
        raise EvalUsageError(f"--shots {n}: {source} has only {len(rows)} rows")
    return [_shot_pair(rows[i], names, f"{source} row {i}") for i in range(n)]


def _read_file_rows(path: str, split: str, *, countdown: bool = False) -> list[dict[str, Any]]:
    """Every row of a local file (a bad line stops, listing all of them); with ``countdown`` the rows are Countdown
    rows and get the ``prompt`` and ``answer`` a recipe's ``data.format: countdown`` builds
    (:func:`align.data.countdown.countdown_rows`)."""
    from align.data.checks import read_rows, settle
    from align.data.formatting import DataFormatError

    raw = read_rows([path], split_name=split)
    if countdown:
        from align.data.countdown import countdown_rows

        raw = countdown_rows(raw)
    settle(raw.problems, "strict", source=path, total=raw.read)
    if not raw.rows:
        raise DataFormatError(f"{path}: no rows")
    return list(raw.rows)


def load_problems(args: argparse.Namespace, cfg: Any, recipe: str | None) -> Problems:
    """The problems of the task flags, read as the run pipeline reads a recipe's held-out split."""
    from align.data.formatting import ColumnNames
    from align.evaluate import eval_problems
    from align.pipeline.stage import column_names

    shots_n = args.shots or 0
    if shots_n < 0:
        raise EvalUsageError(f"--shots must be >= 0, got {shots_n}")
    if cfg is not None:
        from align.pipeline.recipe import _eval_rows, _task_splits, check_data, eval_checker

        if cfg.data.task is not None:
            train, test = _task_splits(cfg)
            record = {"kind": "task", "task": f"builtin:{cfg.data.task}", "task_args": dict(cfg.data.task_args),
                      "split": "test", "rows": len(test)}
        else:
            if not cfg.data.eval_files:
                raise EvalUsageError(f"{recipe}: the recipe has no held-out files (data.eval_files); pass --data")
            from align.build import build_tokenizer

            train, test, _ = check_data(cfg, build_tokenizer(cfg.model.tokenizer or cfg.model.path))
            record = {"kind": "recipe files", "split": "test", "rows": len(test),
                      "files": {f: _sha256(Path(f)) for f in cfg.data.eval_files}}
        record["recipe"] = recipe
        if args.system_prompt is not None or args.raw:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, system_prompt=args.system_prompt or cfg.data.system_prompt,
                use_chat_template=cfg.data.use_chat_template and not args.raw))
        record.update(system_prompt=cfg.data.system_prompt, prompt_column=cfg.data.prompt_column,
                      answer_column=cfg.data.answer_column)
        prompts, answers = _eval_rows(cfg, test)
        names, shot_rows, shot_source = column_names(cfg), train, "train split"
        use_chat = cfg.data.use_chat_template
        checker = args.checker or eval_checker(cfg)
    else:
        path = Path(args.data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {args.data}: no such file")
        prompt_col, answer_col, checker = FORMAT_PRESETS[args.format]
        if args.format == "countdown":
            if args.prompt_column or args.answer_column:
                raise EvalUsageError("--format countdown builds prompts from the numbers and target; "
                                     "--prompt-column / --answer-column do not apply")
            prompt_col, answer_col = "prompt", "answer"
        rows = _read_file_rows(str(path), args.split, countdown=args.format == "countdown")
        total = len(rows)
        prompt_col, answer_col = args.prompt_column or prompt_col, args.answer_column or answer_col
        names = ColumnNames(prompt=prompt_col, answer=answer_col)
        prompts, answers = eval_problems(rows, names, args.num_problems, system_prompt=args.system_prompt,
                                         source=str(path))
        record = {"kind": "file", "path": str(path.resolve()), "sha256": _sha256(path), "format": args.format,
                  "split": args.split, "rows": total, "prompt_column": prompt_col, "answer_column": answer_col,
                  "system_prompt": args.system_prompt}
        use_chat, shot_rows, shot_source = not args.raw, None, None
        checker = args.checker or checker
    shots: dict[str, Any] = {"n": shots_n}
    if shots_n:
        if args.fewshot_file:
            fpath = Path(args.fewshot_file)
            if not fpath.is_file():
                raise FileNotFoundError(f"--fewshot-file {args.fewshot_file}: no such file")
            shot_rows, shot_source = _read_file_rows(str(fpath), "fewshot"), str(fpath)
            shots.update(file=str(fpath.resolve()), sha256=_sha256(fpath))
        elif shot_rows is None:
            raise EvalUsageError("--shots with --data needs --fewshot-file (a file of worked examples)")
        else:
            shots["source"] = shot_source
        if args.format == "countdown" and cfg is None:
            raise EvalUsageError("--format countdown has no worked solutions to show; leave --shots out")
        pairs = _shots(shot_rows, shots_n, names, shot_source)
        shots["rows"] = list(range(shots_n))
        from align.evaluate import few_shot_prompt

        prompts = [few_shot_prompt(p, pairs, use_chat_template=use_chat) for p in prompts]
    record["num_problems"] = len(prompts)
    record["checker"] = checker
    record["use_chat_template"] = use_chat
    return Problems(prompts, answers, record, use_chat_template=use_chat, checker=checker, shots=shots)


@dataclass
class Checkpoint:
    """One model to evaluate: its name in the outputs, its spec, and how it is built."""

    name: str
    spec: str
    model_cfg: Any = None          # a ModelConfig built by align.build (full checkpoints, recipe models)
    adapter: Path | None = None    # a LoRA adapter directory applied on top of model_cfg
    seed: int = 0
