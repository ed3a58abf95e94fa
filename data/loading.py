"""Load datasets through ``datasets``: the built-in task, local jsonl/json/parquet/csv files, or a hub name.

Every dataset is tokenised into ``prompt_ids`` / ``completion_ids`` columns by :func:`tokenize_dataset`
(RL stages: ``prompt_ids`` and the ``prompt`` rewards receive, by :func:`tokenize_prompts`). Local files are read
row by row (:func:`align.data.checks.read_rows`), so a malformed line is named with its file and line. Every row is
checked by the same per-row function that tokenises it (:func:`encode_row`, :func:`encode_rl_row`); rows with a
missing, null, empty or wrongly typed field and rows longer than ``max_length`` (never truncated) are bad rows, all
collected, and ``bad_rows`` (a recipe's ``data.bad_rows``) decides: ``strict`` raises
:class:`~align.data.checks.BadRowsError` listing them, ``skip`` leaves them out and logs the counts by kind.
``system_prompt`` (a recipe's ``data.system_prompt``) is put in front of every prompt
(:func:`~align.data.formatting.add_system_prompt`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, DatasetDict

from align.data.checks import FILE_TYPES, RowProblem, read_rows, rows_to_dataset, screen, settle
from align.data.formatting import (
    ColumnNames,
    DataFormatError,
    _check_messages,
    _prompt_value,
    add_system_prompt,
    detect_format,
    encode_pair,
    encode_prompt,
    required,
    row_error,
    split_row,
)
from align.data.task import ArithmeticTaskSpec, arithmetic_dataset

logger = logging.getLogger(__name__)

BUILTIN_TASKS = ("arithmetic",)
#: local data file types (kept for callers that list them).
DATA_FILE_TYPES = FILE_TYPES


def load_files(files: str | Sequence[str], *, split_name: str = "train", bad_rows: str = "strict") -> Dataset:
    """Load local data files (all of one type) as a ``datasets.Dataset``, reading them row by row.

    Lines that are not rows (malformed JSON, a value that is not an object) are bad rows: ``bad_rows="strict"``
    raises :class:`~align.data.checks.BadRowsError` naming each with its file and line, ``"skip"`` leaves them out.
    The rows themselves are checked when they are tokenised.

    Raises:
        FileNotFoundError: a file does not exist.
        DataFormatError: an unsupported extension, files of mixed types, or lines that are not rows (strict).
    """
    raw = read_rows(files, split_name=split_name)
    settle(raw.problems, bad_rows, source=_files_source(files), total=raw.read)
    if not raw.rows:
        raise DataFormatError(f"{_files_source(files)}: no rows")
    return rows_to_dataset(raw.rows)


def _files_source(files: str | Sequence[str]) -> str:
    return files if isinstance(files, str) else ",".join(files)


def load_task(name: str, *, num_train: int, num_test: int, seed: int, **task_args: Any) -> DatasetDict:
    """A built-in task's train/test splits (``prompt``, ``completion``, ``answer`` columns)."""
    if name == "arithmetic":
        return arithmetic_dataset(num_train, num_test, seed=seed, spec=ArithmeticTaskSpec(**task_args))
    raise DataFormatError(f"unknown built-in task {name!r}; available: {BUILTIN_TASKS}")


def encode_row(row: Mapping[str, Any], tokenizer: Any, where: str, *, fmt: str, use_chat_template: bool,
               names: ColumnNames, system_prompt: str | None = None) -> tuple[tuple[list[int], list[int]], int]:
    """``((prompt_ids, completion_ids), length)`` of one SFT / pre-training row (``fmt`` resolved, not ``auto``);
    a bad row raises :class:`DataFormatError` naming ``where`` and the field."""
    prompt, completion = split_row(row, fmt, where, names)
    if fmt != "text":
        prompt = add_system_prompt(prompt, system_prompt, where)
    p, c = encode_pair(tokenizer, prompt, completion, use_chat_template=use_chat_template and fmt != "text")
    return (p, c), len(p) + len(c)


def resolve_format(columns: Sequence[str], tokenizer: Any, *, fmt: str, use_chat_template: bool,
                   names: ColumnNames, system_prompt: str | None, source: str) -> str:
    """The row format of SFT rows with these columns (``fmt``, or detected when ``auto``), after the checks that
    concern the whole file: a system prompt for plain text, a chat template the tokenizer lacks."""
    if fmt == "auto":
        fmt = detect_format(columns, names)
    if system_prompt is not None and fmt == "text":
        raise DataFormatError(f"{source}: data.system_prompt is set, but the rows are plain text "
                              f"('{names.text}') and have no prompt to put it in front of")
    if use_chat_template and fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")
    return fmt


def check_rl_columns(columns: Sequence[str], tokenizer: Any, *, use_chat_template: bool, names: ColumnNames,
                     source: str) -> None:
    """The checks of RL rows that concern the whole file: a prompt or messages column, a chat template."""
    if names.prompt not in columns and names.messages not in columns:
        raise DataFormatError(f"{source}: an RL stage needs a '{names.prompt}' or '{names.messages}' column; "
                              f"columns are {list(columns)}")
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")


def _places(source: str, n: int, places: Sequence[str] | None) -> Sequence[str]:
    if places is not None:
        if len(places) != n:
            raise ValueError(f"{source}: {len(places)} places given for {n} rows")
        return places
    return [f"{source} row {i}" for i in range(n)]


def tokenize_dataset(ds: Dataset, tokenizer: Any, *, fmt: str = "auto", use_chat_template: bool = True,
                     max_length: int | None = None, source: str = "dataset",
                     names: ColumnNames | None = None, system_prompt: str | None = None, bad_rows: str = "strict",
                     places: Sequence[str] | None = None, problems: list[RowProblem] | None = None) -> Dataset:
    """Add ``prompt_ids`` and ``completion_ids`` columns; check every row (:func:`encode_row`, ``max_length``).

    Args:
        ds: rows in one of the formats of :mod:`align.data.formatting`.
        tokenizer: a Hugging Face tokenizer (with a chat template when ``use_chat_template``).
        fmt: row format, or ``"auto"`` to detect it from the columns.
        max_length: longest allowed prompt + completion in tokens (None: no limit); longer rows are bad rows.
        source: a name for error messages (file name or task).
        system_prompt: put in front of every prompt (not allowed for ``text`` rows, which have none).
        bad_rows: ``strict`` raises listing every bad row; ``skip`` leaves them out and logs counts by kind.
        places: where each row is (``file:line``); default ``<source> row i``.
        problems: when given, bad rows are appended to it and left out, and ``bad_rows`` is not applied.
    """
    names = names or ColumnNames()
    fmt = resolve_format(ds.column_names, tokenizer, fmt=fmt, use_chat_template=use_chat_template, names=names,
                         system_prompt=system_prompt, source=source)

    def encode(row: Mapping[str, Any], where: str) -> tuple[tuple[list[int], list[int]], int]:
        return encode_row(row, tokenizer, where, fmt=fmt, use_chat_template=use_chat_template, names=names,
                          system_prompt=system_prompt)

    found = screen(ds, _places(source, len(ds), places), encode, max_length=max_length)
    if problems is not None:
        problems.extend(found.problems)
    else:
        settle(found.problems, bad_rows, source=source, total=len(ds))
    if not found.kept:
        raise DataFormatError(f"{source}: no usable rows (all {len(ds)} rows are bad)" if len(ds)
                              else f"{source}: the dataset is empty")
    out = ds.select(found.kept) if len(found.kept) < len(ds) else ds
    out = out.add_column("prompt_ids", [p for p, _ in found.values])
    return out.add_column("completion_ids", [c for _, c in found.values])


def rl_prompt(row: Mapping[str, Any], names: ColumnNames, where: str) -> list[dict[str, str]] | str:
    """The prompt of an RL or evaluation row: its ``prompt`` column (a string, or chat messages), or, without one,
    its ``messages`` with the last assistant turn (the reference answer) left out."""
    if row.get(names.prompt) is not None or names.messages not in row:
        if names.prompt not in row and names.messages not in row:
            raise row_error(where, f"has neither a '{names.prompt}' nor a '{names.messages}' column "
                                   f"(columns: {sorted(row)})", field=names.prompt, kind="missing field")
        return _prompt_value(required(row, names.prompt, where), where, names.prompt)
    msgs = _check_messages(row[names.messages], where, names.messages)
    prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    if not prompt:
        raise row_error(where, f"'{names.messages}' has no message before its last assistant turn",
                        field=names.messages, kind="malformed messages")
    return prompt


def check_answer(row: Mapping[str, Any], names: ColumnNames, where: str) -> str:
    """The reference answer of a row (``answer`` column: a non-empty string or a number), as a string."""
    value = required(row, names.answer, where)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise row_error(where, f"field '{names.answer}' must be a string or a number, got {type(value).__name__}",
                        field=names.answer, kind="wrong type")
    text = str(value)
    if not text.strip():
        raise row_error(where, f"field '{names.answer}' is {'empty' if not text else 'whitespace only'}",
                        field=names.answer, kind="empty string")
    return text


def encode_rl_row(row: Mapping[str, Any], tokenizer: Any, where: str, *, use_chat_template: bool, names: ColumnNames,
                  system_prompt: str | None = None, needs_answer: bool = False
                  ) -> tuple[tuple[Any, list[int]], int]:
    """``((prompt as rewards receive it, prompt_ids), len(prompt_ids))`` of one RL row (:func:`rl_prompt`);
    with ``needs_answer`` the row's answer is checked too (:func:`check_answer`)."""
    prompt = rl_prompt(row, names, where)
    if needs_answer:
        check_answer(row, names, where)
    shown = add_system_prompt(prompt, system_prompt, where)
    p = encode_prompt(tokenizer, shown, use_chat_template=use_chat_template)
    return (shown if isinstance(prompt, list) else prompt, p), len(p)


def tokenize_prompts(ds: Dataset, tokenizer: Any, *, use_chat_template: bool = True, max_length: int | None = None,
                     source: str = "dataset", names: ColumnNames | None = None,
                     system_prompt: str | None = None, bad_rows: str = "strict",
                     places: Sequence[str] | None = None, problems: list[RowProblem] | None = None) -> Dataset:
    """Add the ``prompt_ids`` column and the ``prompt`` column that rewards receive, as TRL passes it.

    The prompt is the ``prompt`` column, or the ``messages`` before the last assistant turn
    (:func:`rl_prompt`). ``system_prompt`` goes in front of every prompt when it is tokenized; message-list
    prompts are also passed to the rewards with the system message first, while string prompts stay the strings
    of the dataset (rewards get prompts and completions in the dataset's own form). Used by RL stages, which need
    prompts and whatever columns the rewards read (e.g. ``answer``) but no completion. When the rows have an
    ``answer`` column, a row whose answer is missing, null or empty is a bad row. Prompts longer than
    ``max_length`` are bad rows. ``bad_rows``, ``places`` and ``problems`` as in :func:`tokenize_dataset`.
    """
    names = names or ColumnNames()
    cols = ds.column_names
    check_rl_columns(cols, tokenizer, use_chat_template=use_chat_template, names=names, source=source)

    def encode(row: Mapping[str, Any], where: str) -> tuple[tuple[Any, list[int]], int]:
        return encode_rl_row(row, tokenizer, where, use_chat_template=use_chat_template, names=names,
                             system_prompt=system_prompt, needs_answer=names.answer in cols)

    found = screen(ds, _places(source, len(ds), places), encode, max_length=max_length, measured="prompt")
    if problems is not None:
        problems.extend(found.problems)
    else:
        settle(found.problems, bad_rows, source=source, total=len(ds))
    if not found.kept:
        raise DataFormatError(f"{source}: no usable prompts")
    out = (ds.select(found.kept) if len(found.kept) < len(ds) else ds).add_column(
        "prompt_ids", [p for _, p in found.values])
    # Rewards receive the prompt under the name "prompt", as TRL passes it (prompt_ids is added first, so a
    # prompt-only dataset keeps a column, and its rows, while its prompt column is replaced).
    replaced = [c for c in dict.fromkeys((names.prompt, "prompt")) if c in out.column_names]
    out = out.remove_columns(replaced).add_column("prompt", [shown for shown, _ in found.values])
    return out.select_columns([*(c for c in out.column_names if c not in ("prompt", "prompt_ids")), "prompt",
                               "prompt_ids"])
