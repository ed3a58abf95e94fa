"""Preference pairs: rows with a prompt, a chosen and a rejected response (TRL's preference format).

Accepted row shapes (the column holding the prompt is ``data.prompt_column``; ``chosen`` and ``rejected`` keep
TRL's names):

* **explicit prompt, plain**: ``prompt``, ``chosen`` and ``rejected`` strings;
* **explicit prompt, conversational**: ``prompt`` a list of chat messages, ``chosen`` and ``rejected`` lists of
  assistant messages (``[{"role": "assistant", "content": ...}]``) or strings;
* **implicit prompt, conversational**: no ``prompt`` column; ``chosen`` and ``rejected`` are whole conversations,
  and the prompt is the messages they share at the start (what TRL's ``extract_prompt`` does).

A pair that cannot teach a preference is reported with its place (``train.jsonl:17`` for a line of a JSONL file,
``<source> row i`` otherwise) and the reason: an empty chosen or rejected response, or a chosen response equal to
the rejected one (as text, or after tokenisation). :func:`tokenize_preferences` raises for them, or leaves them out
and logs each one (``bad_pairs``). Malformed rows (missing columns, wrong types) are always an error, as for the
other formats (:class:`~align.data.formatting.DataFormatError`).

:func:`task_preference_pairs` builds pairs from the built-in arithmetic task: the correct worked solution is
chosen, and the rejected one is a looping solution (:func:`~align.data.task.looping_solution`) or a wrong one
(:func:`wrong_solution`: one step's result is off and the error is carried to the final answer).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from align.data.formatting import (
    ColumnNames,
    DataFormatError,
    _as_prompt_messages,
    _check_messages,
    add_system_prompt,
    encode_pair,
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


@dataclass(frozen=True)
class BadPair:
    """A preference row that cannot be used: where it is (``file:line`` or ``source row i``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


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
            raise DataFormatError(f"{where}: field '{field}' holds the response and must contain assistant messages "
                                  f"only, got role(s) {roles} (put the conversation before it in the prompt)")
        return "".join(m["content"] for m in msgs)
    raise DataFormatError(f"{where}: field '{field}' must be a string or assistant messages, "
                          f"got {type(value).__name__}")


def split_preference_row(row: Mapping[str, Any], where: str, names: ColumnNames | None = None
                         ) -> tuple[list[dict[str, str]] | str, str, str]:
    """``(prompt, chosen_text, rejected_text)`` of one preference row (explicit or implicit prompt).

    Raises:
        DataFormatError: a column is missing or has the wrong type, or an implicit-prompt row shares no message.
    """
    names = names or ColumnNames()
    for f in ("chosen", "rejected"):
        if f not in row or row[f] is None:
            raise DataFormatError(f"{where}: missing field '{f}' (preference rows need 'chosen' and 'rejected')")
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get(names.prompt)
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataFormatError(f"{where}: no '{names.prompt}' field; without one, 'chosen' and 'rejected' must be "
                                  "conversations that share their first messages (implicit prompt)")
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
            raise DataFormatError(f"{where}: 'chosen' and 'rejected' share no first message, so there is no "
                                  f"implicit prompt; add a '{names.prompt}' column")
        return c[:k], _response_text(c[k:], where, "chosen"), _response_text(r[k:], where, "rejected")
    if not isinstance(prompt, (str, list)):
        raise DataFormatError(f"{where}: field '{names.prompt}' must be a string or messages, "
                              f"got {type(prompt).__name__}")
    shown = _as_prompt_messages(prompt, where, names.prompt) if isinstance(prompt, list) else prompt
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


def _report(source: str, bad: list[BadPair], total: int) -> str:
    shown = "\n".join(f"  {b}" for b in bad[:SHOWN_BAD_PAIRS])
    more = f"\n  ... and {len(bad) - SHOWN_BAD_PAIRS} more" if len(bad) > SHOWN_BAD_PAIRS else ""
    return f"{source}: {len(bad)} of {total} preference pair(s) cannot teach a preference:\n{shown}{more}"


def tokenize_preferences(ds: Dataset, tokenizer: Any, *, use_chat_template: bool = True,
                         max_length: int | None = None, source: str = "dataset", names: ColumnNames | None = None,
                         system_prompt: str | None = None, bad_pairs: str = "error") -> Dataset:
    """Add ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``pair_index`` (0 … N−1) to preference rows.

    Both responses are encoded after the same prompt with :func:`~align.data.formatting.encode_pair` (so each ends
    with end-of-turn under a chat template, and EOS). Pairs longer than ``max_length`` (prompt plus the longer
    response) are dropped and counted in the log. ``bad_pairs``: ``error`` raises :class:`DataFormatError` listing
    every pair that cannot teach a preference (:func:`pair_problem`, or both responses tokenising to the same ids)
    with its place; ``drop`` leaves them out and logs the same list.
    """
    if bad_pairs not in BAD_PAIR_POLICIES:
        raise ValueError(f"bad_pairs must be one of {BAD_PAIR_POLICIES}, got {bad_pairs!r}")
    names = names or ColumnNames()
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: use_chat_template is set but the tokenizer has no chat template")
    where_of = row_locations(source, len(ds))
    cols: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    keep: list[int] = []
    bad: list[BadPair] = []
    too_long = 0
    for i, row in enumerate(ds):
        where = where_of[i]
        prompt, chosen, rejected = split_preference_row(row, where, names)
        problem = pair_problem(chosen, rejected)
        if problem is not None:
            bad.append(BadPair(where, problem))
            continue
        prompt = add_system_prompt(prompt, system_prompt, where)
        p, c = encode_pair(tokenizer, prompt, chosen, use_chat_template=use_chat_template)
        _, r = encode_pair(tokenizer, prompt, rejected, use_chat_template=use_chat_template)
        if c == r:
            bad.append(BadPair(where, "chosen and rejected tokenize to the same ids"))
            continue
        if max_length is not None and len(p) + max(len(c), len(r)) > max_length:
            too_long += 1
            continue
        keep.append(i)
        for key, ids in zip(("prompt_ids", "chosen_ids", "rejected_ids"), (p, c, r), strict=True):
            cols[key].append(ids)
    if bad:
        text = _report(source, bad, len(ds))
        if bad_pairs == "error":
            raise DataFormatError(f"{text}\n(fix or remove these rows, or set 'vrpo.bad_pairs: drop' to leave them "
                                  "out)")
        logger.warning("%s\nleft out (bad_pairs: drop)", text)
    if too_long:
        logger.warning("%s: dropped %d of %d preference pairs longer than max_length=%d tokens", source, too_long,
                       len(ds), max_length)
    if not keep:
        raise DataFormatError(f"{source}: no usable preference pairs" if len(ds) else f"{source}: the dataset is empty")
    out = ds.select(keep) if len(keep) < len(ds) else ds
    for key, values in cols.items():
        out = out.add_column(key, values)
    return out.add_column("pair_index", list(range(len(keep))))


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
