"""Every row checked before training: reading local files row by row, collecting every bad row, and the policy.

Local files are read here rather than through ``datasets``' JSON reader, so that a malformed line is reported with
its file and 1-based line number and the lines around it are still read:

* ``.jsonl`` (and ``.json`` files that hold JSON lines): one JSON object per line; blank lines are skipped. A row is
  named ``<file>:<line>``.
* ``.json`` holding an array of objects (or an object of equal-length columns): a row is named ``<file> row <i>``
  (``i`` counts from 0, as ``datasets`` indexes rows).
* ``.csv`` and ``.parquet``: read by ``datasets``; a row is named ``<file> row <i>``.

The stages' own per-row functions (:func:`~align.data.loading.encode_row`,
:func:`~align.data.loading.encode_rl_row`, :func:`~align.data.preference.encode_preference_row`) then check each row
and measure it in tokens; :func:`screen` runs one of them over all rows and collects a :class:`RowProblem` per bad
row instead of stopping at the first. :func:`settle` applies the recipe's ``data.bad_rows``: ``strict`` raises
:class:`BadRowsError` listing them (:data:`SHOWN_PROBLEMS` shown, all counted by kind), ``skip`` logs the counts by
kind and the rows are left out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.data.formatting import PROBLEM_KINDS, DataFormatError

logger = logging.getLogger(__name__)

#: what to do with bad rows (``data.bad_rows``): stop listing every one, or leave them out and log counts by kind.
BAD_ROWS = ("strict", "skip")
#: bad rows listed in one error or log message; the rest are counted by kind.
SHOWN_PROBLEMS = 50
#: file types read from local paths (suffix -> reader).
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class RowProblem:
    """One bad row: where it is, the field at fault (None: the row as a whole), why, and its kind.

    ``index`` is the row's position among the rows that were read; a line that is not a row at all has none, and
    ``after`` counts the rows read before it (so that problems can be listed in file order).
    """

    where: str
    reason: str
    kind: str
    field: str | None = None
    index: int | None = None
    after: int = 0

    @property
    def order(self) -> float:
        """Position in reading order (a line that is not a row sorts before the row after it)."""
        return float(self.index) if self.index is not None else self.after - 0.5

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class RawRows:
    """Rows read from local files, before any check: ``rows[i]`` is at ``places[i]``; ``problems`` holds the lines
    that are not rows (malformed JSON, not an object)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    places: list[str] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def read(self) -> int:
        """Rows and malformed lines read."""
        return len(self.rows) + len(self.problems)

    def extend(self, other: RawRows) -> None:
        """Append ``other``'s rows (their indices shifted)."""
        shift = len(self.rows)
        self.rows += other.rows
        self.places += other.places
        self.problems += [dataclasses.replace(p, after=p.after + shift) for p in other.problems]


class BadRowsError(DataFormatError):
    """Rows that cannot be trained on, all of them (``data.bad_rows: strict``).

    Attributes:
        problems: every bad row found, in order.
        total: rows read.
    """

    def __init__(self, source: str, problems: Sequence[RowProblem], total: int) -> None:
        pairs = any(p.kind == "chosen equals rejected"
                    or (p.kind == "empty string" and p.field in ("chosen", "rejected")) for p in problems)
        hint = ", or 'vrpo.bad_pairs: drop' to leave out only the pairs that cannot teach a preference" if pairs else ""
        super().__init__(report(source, problems, total) + "\n(fix or remove these rows, or set 'data.bad_rows: "
                         f"skip' to leave them out{hint})", kind="invalid row")
        self.problems = list(problems)
        self.total = total


def counts_by_kind(problems: Iterable[RowProblem]) -> dict[str, int]:
    """How many problems of each kind, in the order of :data:`~align.data.formatting.PROBLEM_KINDS`."""
    counts = Counter(p.kind for p in problems)
    order = [k for k in PROBLEM_KINDS if k in counts] + sorted(k for k in counts if k not in PROBLEM_KINDS)
    return {k: counts[k] for k in order}


def report(source: str, problems: Sequence[RowProblem], total: int, *, shown: int = SHOWN_PROBLEMS) -> str:
    """``<source>: N bad row(s) of T: counts by kind`` and the first ``shown`` problems, one a line."""
    counts = ", ".join(f"{n} {kind}" for kind, n in counts_by_kind(problems).items())
    lines = [f"{source}: {len(problems)} bad row(s) of {total} ({counts}):"]
    lines += [f"  {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more (all counted above)")
    return "\n".join(lines)


def settle(problems: Sequence[RowProblem], policy: str, *, source: str, total: int) -> None:
    """Apply ``data.bad_rows`` to ``problems``: ``strict`` raises :class:`BadRowsError` when there is one,
    ``skip`` logs the counts by kind (the caller leaves the rows out)."""
    if policy not in BAD_ROWS:
        raise ValueError(f"bad_rows must be one of {BAD_ROWS}, got {policy!r}")
    if not problems:
        return
    if policy == "strict":
        raise BadRowsError(source, problems, total)
    logger.warning("%s\nleft out (data.bad_rows: skip): %d of %d rows remain", report(source, problems, total),
                   total - len(problems), total)


# ---------------------------------------------------------------------------------------------- reading files
def _jsonl(path: Path, text: str, source: str) -> RawRows:
    out = RawRows()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            out.problems.append(RowProblem(where, f"not valid JSON ({_json_error(err)})", "malformed JSON",
                                           after=len(out.rows)))
            continue
        if not isinstance(value, dict):
            out.problems.append(RowProblem(where, f"a row must be a JSON object, got {_json_type(value)}",
                                           "not a JSON object", after=len(out.rows)))
            continue
        out.rows.append(value)
        out.places.append(where)
    return out


def _json_error(err: json.JSONDecodeError) -> str:
    """What is wrong with a JSON text and the column (within its line) where the parser stopped."""
    return f"{err.msg.removesuffix(' at')}, column {err.colno}"


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _json(path: Path, text: str, source: str) -> RawRows:
    """A ``.json`` file: an array of objects, an object of columns, or JSON lines."""
    head = text.lstrip()[:1]
    if head == "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            return RawRows(problems=[RowProblem(f"{source}:{err.lineno}", f"not valid JSON ({_json_error(err)}); the "
                                                "whole array is unreadable", "malformed JSON")])
        out = RawRows()
        for i, row in enumerate(value):
            where = f"{source} row {i}"
            if isinstance(row, dict):
                out.rows.append(row)
                out.places.append(where)
            else:
                out.problems.append(RowProblem(where, f"a row must be a JSON object, got {_json_type(row)}",
                                               "not a JSON object", after=len(out.rows)))
        return out
    if head == "{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return _jsonl(path, text, source)                              # JSON lines (or a malformed object)
        lengths = {len(v) for v in value.values() if isinstance(v, list)}
        if value and all(isinstance(v, list) for v in value.values()) and len(lengths) == 1:
            n = lengths.pop()
            return RawRows([{k: v[i] for k, v in value.items()} for i in range(n)],
                           [f"{source} row {i}" for i in range(n)])
        return RawRows([value], [f"{source}:1"])                          # one JSON line
    return _jsonl(path, text, source)


def _tabular(path: Path, source: str) -> RawRows:
    from datasets import load_dataset

    kind = "csv" if path.suffix.lower() == ".csv" else "parquet"
    try:
        ds = load_dataset(kind, data_files={"train": [str(path)]}, split="train")
    except Exception as exc:  # datasets wraps parse errors in several exception types
        raise DataFormatError(f"could not parse {source}: {exc}") from exc
    return RawRows([dict(r) for r in ds], [f"{source} row {i}" for i in range(len(ds))])


def read_rows(files: str | Sequence[str], *, split_name: str = "train") -> RawRows:
    """Read local data files (all of one type) row by row, keeping the place of every row.

    Raises:
        FileNotFoundError: a file does not exist.
        DataFormatError: no files, an unsupported extension, files of mixed types, or a CSV/parquet file that
            ``datasets`` cannot parse.
    """
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise DataFormatError(f"no data files given for split '{split_name}'")
    kinds = set()
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"data file not found: {p}")
        ext = Path(p).suffix.lower()
        if ext not in FILE_TYPES:
            raise DataFormatError(f"{p}: unsupported data file type {ext!r}; expected one of {sorted(FILE_TYPES)}")
        kinds.add("json" if ext in (".json", ".jsonl") else ext)
    if len(kinds) > 1:
        raise DataFormatError(f"data files for split '{split_name}' mix types {sorted(kinds)}: {paths}")
    out = RawRows()
    for p in paths:
        path = Path(p)
        ext = path.suffix.lower()
        if ext in (".json", ".jsonl"):
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{p}: not UTF-8 text ({err.reason})") from err
            out.extend(_jsonl(path, text, p) if ext == ".jsonl" else _json(path, text, p))
        else:
            out.extend(_tabular(path, p))
    return out


def rows_to_dataset(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A ``datasets.Dataset`` of ``rows``: every column any row has (null where a row lacks it); a column whose
    values have different types in different rows is stored as ``datasets.Json`` (as ``datasets``' JSON reader
    does)."""
    from datasets import Dataset, Features, Json

    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = {c: [r.get(c) for r in rows] for c in columns}
    try:
        return Dataset.from_dict(table)
    except (TypeError, ValueError, OverflowError) as first:  # pyarrow's ArrowTypeError / ArrowInvalid
        features = {}
        for c, values in table.items():
            try:
                features[c] = Dataset.from_dict({c: values}).features[c]
            except (TypeError, ValueError, OverflowError):
                features[c] = Json()
        try:
            return Dataset.from_dict(table, features=Features(features))
        except (TypeError, ValueError, OverflowError) as err:
            raise DataFormatError(f"the rows cannot be stored as one table: {err}") from first


# ---------------------------------------------------------------------------------------------- checking rows
@dataclass
class Screened:
    """What :func:`screen` found: the indices of the good rows, what the row function returned for each, the
    problems, and the length of each good row in tokens."""

    kept: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


def screen(rows: Iterable[Mapping[str, Any]], places: Sequence[str],
           encode: Callable[[Mapping[str, Any], str], tuple[Any, int]], *, max_length: int | None = None,
           measured: str = "prompt + completion") -> Screened:
    """Run ``encode(row, where) -> (value, length)`` over every row; collect a :class:`RowProblem` for each row it
    rejects (:class:`DataFormatError`) and for each row whose length is over ``max_length`` (``measured`` says what
    was counted), instead of stopping at the first."""
    out = Screened()
    for i, row in enumerate(rows):
        where = places[i]
        try:
            value, length = encode(row, where)
        except DataFormatError as err:
            out.problems.append(RowProblem(where, err.reason, err.kind, err.field, i))
            continue
        if max_length is not None and length > max_length:
            out.problems.append(RowProblem(where, f"{measured} is {length} tokens, over data.max_length={max_length}",
                                           "longer than max_length", None, i))
            continue
        out.kept.append(i)
        out.values.append(value)
        out.lengths.append(length)
    return out


def first_per_row(problems: Iterable[RowProblem]) -> list[RowProblem]:
    """One problem per row (the first found; lines that are not rows all stay), in the order of the rows."""
    seen: set[int] = set()
    out = []
    for p in problems:
        if p.index is not None:
            if p.index in seen:
                continue
            seen.add(p.index)
        out.append(p)
    return sorted(out, key=lambda p: p.order)
