"""Preference pairs: rows with a prompt, a chosen and a rejected response (TRL's preference format).

Accepted row shapes (the column holding the prompt is ``data.prompt_column``; ``chosen`` and ``rejected`` keep
TRL's names):

* **explicit prompt, plain**: ``prompt``, ``chosen`` and ``rejected`` strings;
* **explicit prompt, conversational**: ``prompt`` a list of chat messages, ``chosen`` and ``rejected`` lists of
  assistant messages (``[{"role": "assistant", "content": ...}]``) or strings;
* **implicit prompt, conversational**: no ``prompt`` column; ``chosen`` and ``rejected`` are whole conversations,
  and the prompt is the messages they share at the start (what TRL's ``extract_prompt`` does).

Every row is checked by :func:`encode_preference_row`, and bad rows are collected as for the other formats
(:mod:`align.data.checks`): a missing, null or wrongly typed field, a pair longer than ``max_length``, and a pair
that cannot teach a preference: an empty chosen or rejected response, or a chosen response equal to the rejected
one (as text, or after tokenisation). Each is reported with its place (``train.jsonl:17`` for a line of a JSONL
file, ``<source> row i`` otherwise) and reason. ``bad_rows`` (``data.bad_rows``) decides for all of them: ``strict``
raises listing them, ``skip`` leaves them out and logs the counts; ``bad_pairs="drop"`` (``vrpo.bad_pairs``) leaves
out the pairs that cannot teach a preference even under ``strict``.

:func:`task_preference_pairs` builds pairs from the built-in arithmetic task: the correct worked solution is
chosen, and the rejected one is a looping solution (:func:`~align.data.task.looping_solution`) or a wrong one
(:func:`wrong_solution`: one step's result is off and the error is carried to the final answer).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from align.data.checks import RowProblem, report, screen, settle
from align.data.formatting import (
    ColumnNames,
    DataFormatError,
    _check_messages,
    _prompt_value,
    add_system_prompt,
    encode_pair,
    required,
    row_error,
)
from align.data.task import is_correct, looping_solution

logger = logging.getLogger(__name__)

#: what to do with pairs that cannot teach a preference: raise listing them all, or leave them out (logged).
BAD_PAIR_POLICIES = ("error", "drop")
#: how the rejected solution of a built-in task pair is made.
REJECTED_KINDS = ("looping", "wrong", "mixed")
#: columns of a tokenised preference dataset that the trainer reads.
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "pair_index")
#: bad pairs shown in one error or warning; the rest are counted.
SHOWN_BAD_PAIRS = 20

_STEP_RE = re.compile(r"(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)\.")


def row_locations(source: str, n: int) -> list[str]:
    """Where each of the ``n`` rows of ``source`` is: ``file:line`` for a single JSONL file (``datasets`` skips
    blank lines, so row ``i`` is the ``i``-th non-blank line), else ``source row i``."""
    path = Path(source)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8") as f:
            lines = [k for k, line in enumerate(f, start=1) if line.strip()]
        if len(lines) == n:
            return [f"{source}:{k}" for k in lines]
    return [f"{source} row {i}" for i in range(n)]


def _response_text(value: Any, where: str, field: str) -> str:
    """The text of a chosen or rejected response: a string, or the contents of a list of assistant messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value:
            return ""
        msgs = _check_messages(value, where, field)
        roles = sorted({m["role"] for m in msgs} - {"assistant"})
        if roles:
            raise row_error(where, f"field '{field}' holds the response and must contain assistant messages only, "
                                   f"got role(s) {roles} (put the conversation before it in the prompt)", field=field,
                            kind="malformed messages")
        return "".join(m["content"] for m in msgs)
    raise row_error(where, f"field '{field}' must be a string or assistant messages, got {type(value).__name__}",
                    field=field, kind="wrong type")


def split_preference_row(row: Mapping[str, Any], where: str, names: ColumnNames | None = None
                         ) -> tuple[list[dict[str, str]] | str, str, str]:
    """``(prompt, chosen_text, rejected_text)`` of one preference row (explicit or implicit prompt).

    Raises:
        DataFormatError: a column is missing or has the wrong type, or an implicit-prompt row shares no message.
    """
    names = names or ColumnNames()
    note = " (preference rows need 'chosen' and 'rejected')"
    chosen, rejected = required(row, "chosen", where, note), required(row, "rejected", where, note)
    prompt = row.get(names.prompt)
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise row_error(where, f"no '{names.prompt}' field; without one, 'chosen' and 'rejected' must be "
                                   "conversations that share their first messages (implicit prompt)",
                            field=names.prompt, kind="missing field" if names.prompt not in row else "null field")
        c = _check_messages(chosen, where, "chosen") if chosen else []
        r = _check_messages(rejected, where, "rejected") if rejected else []
        if not c or not r:   # an empty side: reported by pair_problem (the other side's text does not matter)
            return [], "" if not c else "-", "" if not r else "-"
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if c == r:                                   # identical conversations: the last turn is the response
            k = max(len(c) - 1, 0)
        if k == 0:
            raise row_error(where, f"'chosen' and 'rejected' share no first message, so there is no implicit "
                                   f"prompt; add a '{names.prompt}' column", field="chosen", kind="malformed messages")
        return c[:k], _response_text(c[k:], where, "chosen"), _response_text(r[k:], where, "rejected")
    shown = _prompt_value(prompt, where, names.prompt)
    return shown, _response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")


def pair_problem(chosen: str, rejected: str) -> str | None:
    """Why a pair cannot teach a preference (an empty side, or both sides equal), or None."""
    if not chosen.strip():
        return "empty chosen response"
    if not rejected.strip():
        return "empty rejected response"
    if chosen == rejected:
        return "chosen equals rejected"
    return None


#: kinds of the problems that ``bad_pairs="drop"`` leaves out under ``bad_rows="strict"``.
_PAIR_KINDS = ("empty string", "chosen equals rejected")


def encode_preference_row(row: Mapping[str, Any], tokenizer: Any, where: str, *, use_chat_template: bool,
                          names: ColumnNames, system_prompt: str | None = None
                          ) -> tuple[tuple[list[int], list[int], list[int]], int]:
    """``((prompt_ids, chosen_ids, rejected_ids), prompt + longer response length)`` of one preference row; a
    malformed row or a pair that cannot teach a preference (:func:`pair_problem`, or both responses tokenising to
    the same ids) raises :class:`DataFormatError` naming ``where``."""
    prompt, chosen, rejected = split_preference_row(row, where, names)
    problem = pair_problem(chosen, rejected)
    if problem is not None:
        field = None if problem == "chosen equals rejected" else problem.split()[1]
        raise row_error(where, problem, field=field,
                        kind="chosen equals rejected" if field is None else "empty string")
    prompt = add_system_prompt(prompt, system_prompt, where)
    p, c = encode_pair(tokenizer, prompt, chosen, use_chat_template=use_chat_template)
    _, r = encode_pair(tokenizer, prompt, rejected, use_chat_template=use_chat_template)
    if c == r:
        raise row_error(where, "chosen and rejected tokenize to the same ids", kind="chosen equals rejected")
    return (p, c, r), len(p) + max(len(c), len(r))


def is_pair_problem(p: RowProblem) -> bool:
    """Whether ``p`` is a pair that cannot teach a preference (what ``bad_pairs="drop"`` leaves out)."""
    return p.kind in _PAIR_KINDS and (p.field in ("chosen", "rejected") or p.field is None)


def tokenize_preferences(ds: Dataset, tokenizer: Any, *, use_chat_template: bool = True,
                         max_length: int | None = None, source: str = "dataset", names: ColumnNames | None = None,
                         system_prompt: str | None = None, bad_pairs: str = "error", bad_rows: str = "strict",
                         places: list[str] | None = None, problems: list[RowProblem] | None = None) -> Dataset:
    """Add ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``pair_index`` (0 … N−1) to preference rows.

    Both responses are encoded after the same prompt with :func:`~align.data.formatting.encode_pair` (so each ends
    with end-of-turn under a chat template, and EOS). Every row is checked (:func:`encode_preference_row`); pairs
    longer than ``max_length`` (prompt plus the longer response) are bad rows too. ``bad_rows``: ``strict`` raises
    :class:`~align.data.checks.BadRowsError` listing every bad row with its place, ``skip`` leaves them out and logs
    the counts. ``bad_pairs="drop"`` leaves out (and logs) the pairs that cannot teach a preference whatever
    ``bad_rows`` says; ``error`` leaves them to ``bad_rows``. ``places`` and ``problems`` as in
    :func:`~align.data.loading.tokenize_dataset`.
    """
    if bad_pairs not in BAD_PAIR_POLICIES:
        raise ValueError(f"bad_pairs must be one of {BAD_PAIR_POLICIES}, got {bad_pairs!r}")
    names = names or ColumnNames()
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")

    def encode(row: Mapping[str, Any], where: str) -> tuple[tuple[list[int], list[int], list[int]], int]:
        return encode_preference_row(row, tokenizer, where, use_chat_template=use_chat_template, names=names,
                                     system_prompt=system_prompt)

    where_of = places if places is not None else row_locations(source, len(ds))
    found = screen(ds, where_of, encode, max_length=max_length, measured="prompt + longer response")
    rest = found.problems
    if bad_pairs == "drop":
        dropped = [p for p in rest if is_pair_problem(p)]
        rest = [p for p in rest if not is_pair_problem(p)]
        if dropped:
            logger.warning("%s\nleft out (vrpo.bad_pairs: drop)", report(source, dropped, len(ds),
                                                                          shown=SHOWN_BAD_PAIRS))
    if problems is not None:
        problems.extend(rest)
    else:
        settle(rest, bad_rows, source=source, total=len(ds))
    if not found.kept:
        raise DataFormatError(f"{source}: no usable preference pairs" if len(ds) else f"{source}: the dataset is empty")
    out = ds.select(found.kept) if len(found.kept) < len(ds) else ds
    for k, key in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
        out = out.add_column(key, [v[k] for v in found.values])
    return out.add_column("pair_index", list(range(len(found.kept))))


# ---------------------------------------------------------------------------------------------- built-in task
def wrong_solution(completion: str, rng: random.Random) -> str | None:
    """A wrong version of a worked solution of the arithmetic task, right in form: one step's result is off by 1 to
    3, every later step starts from the wrong value, and the final answer follows them. None when the completion
    has no step to change."""
    steps = [(int(a), op, int(b)) for a, op, b, _ in _STEP_RE.findall(completion)]
    if not steps:
        return None
    j = rng.randrange(len(steps))
    out, value = [], None
    for k, (a, op, b) in enumerate(steps):
        a = a if value is None else value
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if k == j:
            offsets = [d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0]
            wrong = value + rng.choice(offsets)
            out.append(f"{a} {op} {b} = {wrong}.")
            value = wrong
        else:
            out.append(f"{a} {op} {b} = {value}.")
    return " ".join([*out, f"The answer is {value}."])


def task_preference_pairs(rows: Any, *, seed: int, rejected: str = "mixed", loop_repeats: int = 6) -> Dataset:
    """Preference pairs from rows of the built-in task (``prompt``, ``completion``, ``answer``).

    The correct worked solution is chosen; the rejected one is a looping solution (``looping``), a wrong one
    (``wrong``, :func:`wrong_solution`), or either with probability ½ (``mixed``). Rows whose completion does not
    state the right answer (the looping solutions of ``loop_fraction``) have no correct solution to choose and are
    skipped. Columns: ``prompt``, ``chosen``, ``rejected``, ``answer`` and ``rejected_kind``. Deterministic in
    ``seed``.
    """
    if rejected not in REJECTED_KINDS:
        raise ValueError(f"rejected must be one of {REJECTED_KINDS}, got {rejected!r}")
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": [], "answer": [], "rejected_kind": []}
    skipped = 0
    for row in rows:
        completion, answer = str(row["completion"]), str(row["answer"])
        if not is_correct(completion, answer):
            skipped += 1
            continue
        kind = rejected if rejected != "mixed" else ("looping" if rng.random() < 0.5 else "wrong")
        bad = looping_solution(completion, rng, loop_repeats) if kind == "looping" else wrong_solution(completion, rng)
        if bad is None:
            skipped += 1
            continue
        for key, value in zip(out, (row["prompt"], completion, bad, answer, kind), strict=True):
            out[key].append(value)
    if skipped:
        logger.info("preference pairs from the task: %d row(s) without a correct worked solution skipped", skipped)
    return Dataset.from_dict(out)


# ---------------------------------------------------------------------------------------------- batches
class PreferenceCollator:
    """Batch tokenised pairs: sequence ``2p`` is pair ``p``'s prompt + chosen response, ``2p + 1`` its prompt +
    rejected response, right-padded with ``pad_token_id`` (padding is neither attended nor scored).

    Returns ``input_ids [2B, T]``, ``attention_mask [2B, T]`` and ``response_mask [2B, T]`` (bool), and
    ``pair_index [B]`` (the pairs' ``pair_index`` column, or their position in the batch).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of preference pairs")
        seqs: list[tuple[list[int], list[int]]] = []
        for i, f in enumerate(features):
            missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in f]
            if missing:
                raise ValueError(f"pair {i} lacks {missing} (keys: {sorted(f)})")
            seqs += [(list(f["prompt_ids"]), list(f["chosen_ids"])), (list(f["prompt_ids"]), list(f["rejected_ids"]))]
        T = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(seqs), T, dtype=torch.bool)
        response = torch.zeros(len(seqs), T, dtype=torch.bool)
        for s, (p, c) in enumerate(seqs):
            ids[s, : len(p) + len(c)] = torch.as_tensor(p + c, dtype=torch.long)
            attention[s, : len(p) + len(c)] = True
            response[s, len(p): len(p) + len(c)] = True
        index = torch.tensor([int(f.get("pair_index", i)) for i, f in enumerate(features)], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attention, "response_mask": response, "pair_index": index}
