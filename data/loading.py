"""Load datasets through ``datasets``: the built-in task, local jsonl/json/parquet/csv files, or a hub name.

Every dataset is tokenised into ``prompt_ids`` / ``completion_ids`` columns by :func:`tokenize_dataset`
(RL stages: ``prompt_ids`` and the ``prompt`` rewards receive, by :func:`tokenize_prompts`); rows that are
malformed raise :class:`~align.data.formatting.DataFormatError` naming the file and row; rows longer than
``max_length`` are dropped and counted in the log (never silently truncated). ``system_prompt`` (a recipe's
``data.system_prompt``) is put in front of every prompt (:func:`~align.data.formatting.add_system_prompt`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from align.data.formatting import (
    ColumnNames,
    DataFormatError,
    _as_prompt_messages,
    _check_messages,
    add_system_prompt,
    detect_format,
    encode_pair,
    encode_prompt,
    split_row,
)
from align.data.task import ArithmeticTaskSpec, arithmetic_dataset

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_TASKS = ("arithmetic",)


def load_files(files: str | Sequence[str], *, split_name: str = "train") -> Dataset:
    """Load local data files (all of one type) as a ``datasets.Dataset``.

    Raises:
        FileNotFoundError: a file does not exist.
        DataFormatError: an unsupported extension, or files of mixed types.
    """
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise DataFormatError(f"no data files given for split '{split_name}'")
    kinds = set()
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"data file not found: {p}")
        ext = Path(p).suffix.lower()
        if ext not in _BUILDERS:
            raise DataFormatError(f"{p}: unsupported data file type {ext!r}; expected one of {sorted(_BUILDERS)}")
        kinds.add(_BUILDERS[ext])
    if len(kinds) > 1:
        raise DataFormatError(f"data files for split '{split_name}' mix types {sorted(kinds)}: {paths}")
    try:
        return load_dataset(kinds.pop(), data_files={split_name: paths}, split=split_name)
    except Exception as exc:  # datasets wraps parse errors in several exception types
        raise DataFormatError(f"could not parse {paths}: {exc}") from exc


def load_task(name: str, *, num_train: int, num_test: int, seed: int, **task_args: Any) -> DatasetDict:
    """A built-in task's train/test splits (``prompt``, ``completion``, ``answer`` columns)."""
    if name == "arithmetic":
        return arithmetic_dataset(num_train, num_test, seed=seed, spec=ArithmeticTaskSpec(**task_args))
    raise DataFormatError(f"unknown built-in task {name!r}; available: {BUILTIN_TASKS}")


def tokenize_dataset(ds: Dataset, tokenizer: Any, *, fmt: str = "auto", use_chat_template: bool = True,
                     max_length: int | None = None, source: str = "dataset",
                     names: ColumnNames | None = None, system_prompt: str | None = None) -> Dataset:
    """Add ``prompt_ids`` and ``completion_ids`` columns; drop (and count) rows over ``max_length``.

    Args:
        ds: rows in one of the formats of :mod:`align.data.formatting`.
        tokenizer: a Hugging Face tokenizer (with a chat template when ``use_chat_template``).
        fmt: row format, or ``"auto"`` to detect it from the columns.
        max_length: longest allowed prompt + completion in tokens (None: no limit).
        source: a name for error messages (file name or task).
        system_prompt: put in front of every prompt (not allowed for ``text`` rows, which have none).
    """
    names = names or ColumnNames()
    if fmt == "auto":
        fmt = detect_format(ds.column_names, names)
    if system_prompt is not None and fmt == "text":
        raise DataFormatError(f"{source}: data.system_prompt is set, but the rows are plain text "
                              f"('{names.text}') and have no prompt to put it in front of")
    if use_chat_template and fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")
    prompt_ids: list[list[int]] = []
    completion_ids: list[list[int]] = []
    keep: list[int] = []
    too_long = 0
    for i, row in enumerate(ds):
        where = f"{source} row {i}"
        prompt, completion = split_row(row, fmt, where, names)
        if fmt != "text":
            prompt = add_system_prompt(prompt, system_prompt, where)
        p, c = encode_pair(tokenizer, prompt, completion, use_chat_template=use_chat_template and fmt != "text")
        if max_length is not None and len(p) + len(c) > max_length:
            too_long += 1
            continue
        keep.append(i)
        prompt_ids.append(p)
        completion_ids.append(c)
    if too_long:
        logger.warning("%s: dropped %d of %d rows longer than max_length=%d tokens", source, too_long, len(ds),
                       max_length)
    if not keep:
        raise DataFormatError(f"{source}: no usable rows (all {len(ds)} rows are longer than max_length={max_length})"
                              if len(ds) else f"{source}: the dataset is empty")
    out = ds.select(keep) if too_long else ds
    out = out.add_column("prompt_ids", prompt_ids).add_column("completion_ids", completion_ids)
    return out


def rl_prompt(row: Mapping[str, Any], names: ColumnNames, where: str) -> list[dict[str, str]] | str:
    """The prompt of an RL or evaluation row: its ``prompt`` column (a string, or chat messages), or, without one,
    its ``messages`` with the last assistant turn (the reference answer) left out."""
    if names.prompt in row:
        prompt = row[names.prompt]
        if not isinstance(prompt, (str, list)):
            raise DataFormatError(f"{where}: field '{names.prompt}' must be a string or messages, "
                                  f"got {type(prompt).__name__}")
        return _as_prompt_messages(prompt, where, names.prompt) if isinstance(prompt, list) else prompt
    if names.messages not in row:
        raise DataFormatError(f"{where}: has neither a '{names.prompt}' nor a '{names.messages}' column "
                              f"(columns: {sorted(row)})")
    msgs = _check_messages(row[names.messages], where, names.messages)
    prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    if not prompt:
        raise DataFormatError(f"{where}: '{names.messages}' has no message before its last assistant turn")
    return prompt


def tokenize_prompts(ds: Dataset, tokenizer: Any, *, use_chat_template: bool = True, max_length: int | None = None,
                     source: str = "dataset", names: ColumnNames | None = None,
                     system_prompt: str | None = None) -> Dataset:
    """Add the ``prompt_ids`` column and the ``prompt`` column that rewards receive, as TRL passes it.

    The prompt is the ``prompt`` column, or the ``messages`` before the last assistant turn
    (:func:`rl_prompt`). ``system_prompt`` goes in front of every prompt when it is tokenized; message-list
    prompts are also passed to the rewards with the system message first, while string prompts stay the strings
    of the dataset (rewards get prompts and completions in the dataset's own form). Used by RL stages, which need
    prompts and whatever columns the rewards read (e.g. ``answer``) but no completion. Prompts longer than
    ``max_length`` are dropped and counted in the log.
    """
    names = names or ColumnNames()
    cols = ds.column_names
    if names.prompt not in cols and names.messages not in cols:
        raise DataFormatError(f"{source}: an RL stage needs a '{names.prompt}' or '{names.messages}' column; "
                              f"columns are {cols}")
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")
    ids: list[list[int]] = []
    prompts: list[Any] = []
    keep: list[int] = []
    too_long = 0
    for i, row in enumerate(ds):
        where = f"{source} row {i}"
        prompt = rl_prompt(row, names, where)
        shown = add_system_prompt(prompt, system_prompt, where)
        p = encode_prompt(tokenizer, shown, use_chat_template=use_chat_template)
        if max_length is not None and len(p) > max_length:
            too_long += 1
            continue
        keep.append(i)
        ids.append(p)
        prompts.append(shown if isinstance(prompt, list) else prompt)
    if too_long:
        logger.warning("%s: dropped %d of %d prompts longer than max_length=%d tokens", source, too_long, len(ds),
                       max_length)
    if not keep:
        raise DataFormatError(f"{source}: no usable prompts")
    out = (ds.select(keep) if too_long else ds).add_column("prompt_ids", ids)
    # Rewards receive the prompt under the name "prompt", as TRL passes it (prompt_ids is added first, so a
    # prompt-only dataset keeps a column, and its rows, while its prompt column is replaced).
    replaced = [c for c in dict.fromkeys((names.prompt, "prompt")) if c in out.column_names]
    out = out.remove_columns(replaced).add_column("prompt", prompts)
    return out.select_columns([*(c for c in out.column_names if c not in ("prompt", "prompt_ids")), "prompt",
                               "prompt_ids"])
