"""Load datasets through ``datasets``: the built-in task, local jsonl/json/parquet/csv files, or a hub name.

Every dataset is tokenised into ``prompt_ids`` / ``completion_ids`` columns by :func:`tokenize_dataset`;
rows that are malformed raise :class:`~align.data.formatting.DataFormatError` naming the file and row;
rows longer than ``max_length`` are dropped and counted in the log (never silently truncated).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from align.data.formatting import ColumnNames, DataFormatError, detect_format, encode_pair, split_row
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
                     names: ColumnNames | None = None) -> Dataset:
    """Add ``prompt_ids`` and ``completion_ids`` columns; drop (and count) rows over ``max_length``.

    Args:
        ds: rows in one of the formats of :mod:`align.data.formatting`.
        tokenizer: a Hugging Face tokenizer (with a chat template when ``use_chat_template``).
        fmt: row format, or ``"auto"`` to detect it from the columns.
        max_length: longest allowed prompt + completion in tokens (None: no limit).
        source: a name for error messages (file name or task).
    """
    names = names or ColumnNames()
    if fmt == "auto":
        fmt = detect_format(ds.column_names, names)
    if use_chat_template and fmt != "text" and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")
    prompt_ids: list[list[int]] = []
    completion_ids: list[list[int]] = []
    keep: list[int] = []
    too_long = 0
    for i, row in enumerate(ds):
        where = f"{source} row {i}"
        prompt, completion = split_row(row, fmt, where, names)
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


def tokenize_prompts(ds: Dataset, tokenizer: Any, *, use_chat_template: bool = True, max_length: int | None = None,
                     source: str = "dataset", names: ColumnNames | None = None) -> Dataset:
    """Add a ``prompt_ids`` column from the prompt (or the ``messages`` before the last assistant turn).

    Used by RL stages, which need prompts and whatever columns the rewards read (e.g. ``answer``) but no
    completion. Prompts longer than ``max_length`` are dropped and counted in the log.
    """
    from align.data.formatting import _as_prompt_messages, _check_messages, encode_prompt

    names = names or ColumnNames()
    cols = ds.column_names
    if names.prompt not in cols and names.messages not in cols:
        raise DataFormatError(f"{source}: an RL stage needs a '{names.prompt}' or '{names.messages}' column; "
                              f"columns are {cols}")
    ids: list[list[int]] = []
    prompts: list[Any] = []
    keep: list[int] = []
    too_long = 0
    for i, row in enumerate(ds):
        where = f"{source} row {i}"
        if names.prompt in cols:
            prompt = row[names.prompt]
            if not isinstance(prompt, (str, list)):
                raise DataFormatError(f"{where}: field '{names.prompt}' must be a string or messages, "
                                      f"got {type(prompt).__name__}")
            prompt = _as_prompt_messages(prompt, where, names.prompt) if isinstance(prompt, list) else prompt
        else:
            msgs = _check_messages(row[names.messages], where, names.messages)
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        p = encode_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
        if max_length is not None and len(p) > max_length:
            too_long += 1
            continue
        keep.append(i)
        ids.append(p)
        prompts.append(prompt)
    if too_long:
        logger.warning("%s: dropped %d of %d prompts longer than max_length=%d tokens", source, too_long, len(ds),
                       max_length)
    if not keep:
        raise DataFormatError(f"{source}: no usable prompts")
    out = ds.select(keep) if too_long else ds
    # Rewards receive the prompt under the name "prompt", as TRL passes it.
    out = out.remove_columns([c for c in dict.fromkeys((names.prompt, "prompt")) if c in out.column_names])
    return out.add_column("prompt", prompts).add_column("prompt_ids", ids)
