"""Loop detection on token ids (``docs/concepts.md`` §6).

A completion *loops* when a block of it is repeated: ``k >= k_min`` copies of a unit. Two rules find the
tokens inside loops (:mod:`align.loops_scan`), and the *loop fraction* is the share of the completion's
tokens they cover. Trailing EOS/pad runs are never part of a completion, and so never a loop.

* *Periodic rule* (``p_max``, ``k_min``, ``min_span``, ``k_counter``, ``counter_min_period``): a p-gram,
  ``1 <= p <= p_max``, repeated in a row over ``need(p) = max(k_min * p, min_span)`` tokens, so short
  units need more copies (``3 + 3 + 3`` is not a loop, ``we, we, we, ...`` to the budget is); plus the
  *counter rule*: units of ``>= counter_min_period`` tokens whose copies differ in one token each, over
  ``max(k_counter * p, min_span)`` tokens. One vectorised pass per period.
* *Copy rule* (``copy_ngram``, ``copy_gap``, ``copy_min_span``): ``k_min`` copies of a block of any
  length at any distance, each copy spanning ``>= copy_min_span`` tokens, allowing a varying token every
  ``copy_gap`` tokens or so (an ordinal, a list number, a typo) and other tokens between the copies. It
  finds the long units (a whole attempt of 40-150 tokens repeated to the budget) and the few copies of a
  long block that periods ``<= p_max`` cannot see, in one pass whatever the distance.

Vectorised with torch over the batch and the positions. Partly decoded sequences (decode-time guard):
positions holding an ``unknown_ids`` token (the mask token) match nothing and are left out of the
denominator; :func:`loop_coverage` returns tensors only (no Python per row) for that use.

Token counts depend on the tokenizer; :mod:`align.loops_text` finds the same kinds of loops on text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .loops_scan import scan_copies, scan_periodic

__all__ = [
    "DEFAULT_COPY_GAP",
    "DEFAULT_COPY_MIN_SPAN",
    "DEFAULT_COPY_NGRAM",
    "DEFAULT_COUNTER_MIN_PERIOD",
    "DEFAULT_K_COUNTER",
    "DEFAULT_K_MIN",
    "DEFAULT_MIN_SPAN",
    "DEFAULT_P_MAX",
    "LoopCoverage",
    "LoopParams",
    "LoopReport",
    "LoopSpan",
    "detect_loops",
    "loop_coverage",
]

DEFAULT_P_MAX = 32
DEFAULT_K_MIN = 3
DEFAULT_MIN_SPAN = 24
DEFAULT_K_COUNTER: int | None = 6
DEFAULT_COUNTER_MIN_PERIOD = 10
DEFAULT_COPY_NGRAM = 6
DEFAULT_COPY_GAP = 8
DEFAULT_COPY_MIN_SPAN: int | None = 24

IdsInput = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class LoopSpan:
    """One loop: ``repeats`` copies of a ``period``-gram starting at token ``start``.

    ``length`` is the number of tokens covered (it may end in a partial copy), so the span is
    ``[start, start + length)``. ``exact`` is False when tokens vary between copies. ``kind`` names the
    rule: ``"periodic"`` (exact or counter) or ``"copies"`` (a run of tokens that only the copy rule
    covers; its copies may lie apart, so ``period`` is 0 and ``repeats`` 1 there).
    """

    start: int
    period: int
    repeats: int
    length: int
    exact: bool = True
    kind: str = "periodic"

    @property
    def end(self) -> int:
        """One past the last covered token."""
        return self.start + self.length


@dataclass(frozen=True)
class LoopReport:
    """Loops found in one completion.

    ``fraction`` = ``n_covered / n_tokens`` (0.0 for an empty completion), where ``n_tokens`` counts
    the completion's tokens without the trailing pad run and without unknown (masked) positions.
    """

    fraction: float
    spans: tuple[LoopSpan, ...]
    n_tokens: int
    n_covered: int

    @property
    def has_loop(self) -> bool:
        """Whether any loop span was found."""
        return self.n_covered > 0


class LoopCoverage(NamedTuple):
    """Tensor form of the detection: ``covered`` [B, L] bool, ``n_tokens`` [B] long, ``fraction`` [B] float."""

    covered: torch.Tensor
    n_tokens: torch.Tensor
    fraction: torch.Tensor


@dataclass(frozen=True)
class LoopParams:
    """Detection parameters (see :func:`detect_loops`); validated on construction."""

    p_max: int = DEFAULT_P_MAX
    k_min: int = DEFAULT_K_MIN
    min_span: int = DEFAULT_MIN_SPAN
    k_counter: int | None = DEFAULT_K_COUNTER
    counter_min_period: int = DEFAULT_COUNTER_MIN_PERIOD
    copy_ngram: int = DEFAULT_COPY_NGRAM
    copy_gap: int = DEFAULT_COPY_GAP
    copy_min_span: int | None = DEFAULT_COPY_MIN_SPAN

    def __post_init__(self) -> None:
        for name, low in (("p_max", 1), ("k_min", 2), ("min_span", 1), ("counter_min_period", 2),
                          ("copy_ngram", 2), ("copy_gap", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("k_counter", "copy_min_span"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
                raise ValueError(f"{name} must be None or an int >= 2, got {value!r}")

    def need(self, p: int, counter: bool = False) -> int:
        """Tokens a loop of period p must cover: ``max(k * p, min_span)``, k = k_min (exact) or k_counter."""
        k = self.k_counter if counter else self.k_min
        return max(int(k) * p, self.min_span)


def _to_batch(completion_ids: IdsInput) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the input into ``x`` [B, L] (long) and per-row lengths [B] (rows shorter than L are padded)."""
    if isinstance(completion_ids, torch.Tensor):
        if completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be 2-D [B, L], got shape {tuple(completion_ids.shape)}")
        if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
            raise TypeError(f"completion_ids must hold integer token ids, got dtype {completion_ids.dtype}")
        x = completion_ids.long()
        return x, torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    rows: list[torch.Tensor] = []
    for i, ids in enumerate(completion_ids):
        row = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids), dtype=torch.long)
        if row.dim() != 1:
            raise ValueError(f"completion_ids[{i}] must be 1-D, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise TypeError(f"completion_ids[{i}] must hold integer token ids, got dtype {row.dtype}")
        rows.append(row.long())
    device = rows[0].device if rows else torch.device("cpu")
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.long, device=device)
    width = int(lengths.max()) if rows else 0
    x = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        x[i, : row.numel()] = row.to(device)
    return x, lengths


def _prepare(
    completion_ids: IdsInput, pad_ids: Sequence[int], unknown_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids with every non-token position (trailing pad, unknown, beyond the row) made unique.

    Returns ``x`` [B, L] where such positions hold ``-(i + 1)`` (matching nothing) and ``n_tokens`` [B].
    """
    x, lengths = _to_batch(completion_ids)
    L = x.shape[1]
    pos = torch.arange(L, device=x.device)
    in_row = pos.unsqueeze(0) < lengths.unsqueeze(1)
    if bool((x[in_row] < 0).any()):
        raise ValueError("completion_ids must be non-negative token ids")
    keep = in_row
    if len(pad_ids):
        is_pad = torch.isin(x, torch.as_tensor(list(pad_ids), device=x.device)) | ~in_row
        # last non-pad position + 1 = the completion's length without its trailing pad/EOS run
        n_kept = ((~is_pad) * (pos + 1)).amax(dim=1) if L else lengths
        keep = pos.unsqueeze(0) < n_kept.unsqueeze(1)
    if len(unknown_ids):
        keep = keep & ~torch.isin(x, torch.as_tensor(list(unknown_ids), device=x.device))
    x = torch.where(keep, x, -(pos + 1))
    return x, keep.sum(dim=1)


def _run(
    completion_ids: IdsInput,
    pad_ids: Sequence[int],
    unknown_ids: Sequence[int],
    ignore_ids: Sequence[int],
    prm: LoopParams,
    want_spans: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int, bool]], torch.Tensor | None]:
    """Covered tokens [B, L], token counts [B], periodic spans, and the tokens covered by copies (or None)."""
    x, n_tokens = _prepare(completion_ids, pad_ids, unknown_ids)
    ignorable = torch.isin(x, torch.as_tensor(list(ignore_ids), device=x.device)) if len(ignore_ids) else None
    covered, spans = scan_periodic(x, ignorable, prm, want_spans)
    copies = None
    if prm.copy_min_span is not None and x.shape[1]:
        copies = scan_copies(x, ignorable, prm.copy_ngram, prm.copy_gap, prm.copy_min_span, prm.k_min)
        covered = covered | copies
    return covered, n_tokens, spans, copies


def loop_coverage(
    completion_ids: IdsInput,
    *,
    pad_ids: Sequence[int] = (),
    unknown_ids: Sequence[int] = (),
    ignore_ids: Sequence[int] = (),
    **params: int | None,
) -> LoopCoverage:
    """Which tokens lie in a loop, as tensors (no per-row Python); arguments as in :func:`detect_loops`
    (``params`` are the :class:`LoopParams` fields: ``p_max``, ``k_min``, ``min_span``, ``k_counter``,
    ``counter_min_period``, ``copy_ngram``, ``copy_gap``, ``copy_min_span``).

    Cheap enough to call on partly decoded batches at every denoising step (pass the mask token in
    ``unknown_ids``); runs on the device of ``completion_ids``.
    """
    covered, n_tokens, _, _ = _run(completion_ids, pad_ids, unknown_ids, ignore_ids, LoopParams(**params),
                                   want_spans=False)
    fraction = covered.sum(dim=1).float() / n_tokens.clamp(min=1).float()
    return LoopCoverage(covered, n_tokens, fraction)


def _copy_runs(copies: torch.Tensor, covered: torch.Tensor,
               kept: list[list[LoopSpan]]) -> list[tuple[int, int, int]]:
    """Maximal runs of copy-rule tokens outside every periodic span, as (row, start, length)."""
    only = copies.clone()
    for row, spans in enumerate(kept):
        for s in spans:
            only[row, s.start : s.end] = False
    first = only.clone()
    first[:, 1:] &= ~only[:, :-1]
    last = only.clone()
    last[:, :-1] &= ~only[:, 1:]
    return [(r, a, b - a + 1) for (r, a), (_, b) in zip(first.nonzero().tolist(), last.nonzero().tolist())]


def detect_loops(
    completion_ids: IdsInput,
    *,
    pad_ids: Sequence[int] = (),
    unknown_ids: Sequence[int] = (),
    ignore_ids: Sequence[int] = (),
    p_max: int = DEFAULT_P_MAX,
    k_min: int = DEFAULT_K_MIN,
    min_span: int = DEFAULT_MIN_SPAN,
    k_counter: int | None = DEFAULT_K_COUNTER,
    counter_min_period: int = DEFAULT_COUNTER_MIN_PERIOD,
    copy_ngram: int = DEFAULT_COPY_NGRAM,
    copy_gap: int = DEFAULT_COPY_GAP,
    copy_min_span: int | None = DEFAULT_COPY_MIN_SPAN,
) -> list[LoopReport]:
    """Find repetition loops in a batch of completions.

    Args:
        completion_ids: token ids, a [B, L] integer tensor or a list of 1-D tensors / int lists
            (rows may differ in length). Ids must be non-negative.
        pad_ids: EOS/pad ids; the trailing run of them is cut off before detection.
        unknown_ids: ids of positions not decoded yet (the mask token); they match nothing and do
            not count in the denominator.
        ignore_ids: ids that cannot make up a loop on their own (e.g. whitespace/newline tokens): a
            repeated unit made only of them is not a loop.
        p_max: longest period p tried.
        k_min: fewest exact copies of the unit (k >= k_min).
        min_span: fewest tokens a loop must cover; short periods then need ``ceil(min_span / p)`` copies.
        k_counter: fewest copies of a unit in which one token varies from copy to copy (a counter,
            "Step 7: ... Step 8: ...", or a sampled substitution); ``None`` allows exact loops only.
        counter_min_period: shortest period for which a varying token is allowed.
        copy_ngram: ``w``, the n-gram size by which copies are found (a copy must match in runs of
            ``w`` tokens; a varying token breaks the ``w`` n-grams that hold it).
        copy_gap: longest break (in positions) bridged inside one copy.
        copy_min_span: fewest tokens one copy must span for the copy rule; ``None`` turns it off.

    Returns:
        One :class:`LoopReport` per completion: loop fraction and the spans found, each periodic span
        with the smallest period that explains it (spans found again at multiples of that period, or
        inside a span of a smaller period, are dropped; overlapping spans of unrelated periods are
        kept), then the runs of tokens only the copy rule covers (``kind="copies"``).
    """
    prm = LoopParams(p_max, k_min, min_span, k_counter, counter_min_period, copy_ngram, copy_gap, copy_min_span)
    covered, n_tokens, raw, copies = _run(completion_ids, pad_ids, unknown_ids, ignore_ids, prm, want_spans=True)
    n_cov = covered.sum(dim=1).tolist()
    n_tok = n_tokens.tolist()
    kept: list[list[LoopSpan]] = [[] for _ in range(covered.shape[0])]
    for row, start, period, length, exact in sorted(raw, key=lambda s: (s[0], s[2], not s[4], s[1])):
        if any(s.start <= start and start + length <= s.end for s in kept[row]):
            continue  # the same tokens are already explained by a smaller period (or an exact loop)
        kept[row].append(LoopSpan(start, period, length // period, length, exact))
    if copies is not None:
        for row, start, length in _copy_runs(copies, covered, kept):
            kept[row].append(LoopSpan(start, 0, 1, length, exact=False, kind="copies"))
    return [
        LoopReport(
            fraction=(n_cov[b] / n_tok[b]) if n_tok[b] else 0.0,
            spans=tuple(sorted(kept[b], key=lambda s: s.start)),
            n_tokens=n_tok[b],
            n_covered=n_cov[b],
        )
        for b in range(covered.shape[0])
    ]
