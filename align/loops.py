"""Loop detection on token ids (``docs/concepts.md`` §6).

A *loop* is a span in which a p-gram (1 <= p <= p_max) repeats k >= k_min times in a row, exactly;
the *loop fraction* is the share of the completion's tokens covered by such spans. Trailing
EOS/pad runs are never part of a completion, and so never a loop.

To keep legitimate repetition (enumerations, tables, code, ``3+3+3``) out, a span must also cover
at least ``min_span`` tokens, so short periods need more copies:
``need(p) = max(k_min * p, min_span)`` tokens, i.e. ``k(p) = max(k_min, ceil(min_span / p))`` copies.
Repeats must be exact, so a unit with a varying counter ("1. ... 2. ...") never matches itself.
The one exception is the *counter rule*: among tokens outside exact loops, a unit of at least
``counter_min_period`` tokens whose copies differ in one token each ("Step 7: ... Step 8: ...", or a
sampled substitution) is a loop once it covers ``max(k_counter * p, min_span)`` tokens.

Vectorised with torch over the batch and the positions; the only Python loop is over periods p.
For one p, ``x_i = x_{i+p}`` for ``r = need(p) - p`` consecutive i is exactly a p-periodic window
of ``need(p)`` tokens; windows are found with a cumulative sum and their tokens marked through a
difference array, so each period costs a handful of passes over the rows that can hold a loop.

Partly decoded sequences (decode-time guard): positions holding an ``unknown_ids`` token (the mask
token) match nothing and are left out of the denominator, so exact loops are made of decoded
tokens only (the counter rule tolerates one unknown per copy); :func:`loop_coverage` returns
tensors only (no Python per row) for that use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
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

IdsInput = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class LoopSpan:
    """One loop: ``repeats`` copies of a ``period``-gram starting at token ``start``.

    ``length`` is the number of tokens covered (it may end in a partial copy), so the span is
    ``[start, start + length)``. ``exact`` is False when one token varies between copies.
    """

    start: int
    period: int
    repeats: int
    length: int
    exact: bool = True

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

    def __post_init__(self) -> None:
        for name, low in (("p_max", 1), ("k_min", 2), ("min_span", 1), ("counter_min_period", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.k_counter is not None and (not isinstance(self.k_counter, int) or self.k_counter < 2):
            raise ValueError(f"k_counter must be None or an int >= 2, got {self.k_counter!r}")

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


def _windows(base: torch.Tensor, w: int, cdtype: torch.dtype) -> torch.Tensor:
    """``full[j]``: ``base[j : j + w]`` is all True (a cumulative sum, then one difference)."""
    S = torch.zeros(base.shape[0], base.shape[1] + 1, dtype=cdtype, device=base.device)
    torch.cumsum(base, dim=1, dtype=cdtype, out=S[:, 1:])
    return (S[:, w:] - S[:, : S.shape[1] - w]) == w


def _spread(full: torch.Tensor, span: int, width: int) -> torch.Tensor:
    """Positions ``[j, j + span)`` for every True ``full[j]``, as a [R, width] bool (difference array)."""
    n = full.shape[1]
    d = torch.zeros(full.shape[0], width + 1, dtype=torch.int32, device=full.device)
    d[:, :n] += full.to(torch.int32)
    d[:, span : span + n] -= full.to(torch.int32)
    return d.cumsum(dim=1)[:, :width] > 0


def _at_most_one_miss(eq: torch.Tensor, p: int, cdtype: torch.dtype) -> torch.Tensor:
    """``good[i]``: at most one False in ``eq[i : i + p]``."""
    S = torch.zeros(eq.shape[0], eq.shape[1] + 1, dtype=cdtype, device=eq.device)
    torch.cumsum(~eq, dim=1, dtype=cdtype, out=S[:, 1:])
    return (S[:, p:] - S[:, : S.shape[1] - p]) <= 1


def _runs(full: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of True in ``full`` as (row, first, last)."""
    first = full.clone()
    first[:, 1:] &= ~full[:, :-1]
    last = full.clone()
    last[:, :-1] &= ~full[:, 1:]
    return [(r, a, b) for (r, a), (_, b) in zip(first.nonzero().tolist(), last.nonzero().tolist())]


def _unit_ok(mask: torch.Tensor, useful: torch.Tensor | None, p: int) -> torch.Tensor:
    """Drop windows ``j`` whose unit ``x[j : j + p]`` is made only of ignorable tokens."""
    if useful is None:
        return mask
    n = mask.shape[1]
    return mask & ((useful[:, p : p + n] - useful[:, :n]) > 0)


def _exact(
    e: torch.Tensor, p: int, need: int, useful: torch.Tensor | None, L: int, cdtype: torch.dtype, want: bool
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Exact loops: w = need - p consecutive eq_i make a p-periodic window of `need` tokens [j, j + w + p)."""
    w = need - p
    full = _unit_ok(_windows(e, w, cdtype), useful, p)
    runs = [(r, a, b + w - 1) for r, a, b in _runs(full)] if want else []  # as eq positions
    return _spread(full, w + p, L), runs


def _counter(
    e: torch.Tensor, p: int, need: int, useful: torch.Tensor | None, L: int, cdtype: torch.dtype, want: bool
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Loops whose copies differ in one token: runs of windows eq[i : i + p] with at most one mismatch.

    A run of such windows from j0 to j1 spans eq positions [j0, j1 + p - 1]; it is trimmed to its
    first and last match (a mismatch at an edge is the loop's boundary, not part of it) and kept
    when the trimmed tokens [a, b + p] number at least `need`. Only matched positions are covered,
    so the varying tokens themselves are not counted.
    """
    R, M = e.shape
    good = _unit_ok(_at_most_one_miss(e, p, cdtype), useful, p)
    empty = e.new_zeros(R, L)
    if not bool(good.any()):
        return empty, []
    first = good.clone()
    first[:, 1:] &= ~good[:, :-1]
    last = good.clone()
    last[:, :-1] &= ~good[:, 1:]
    (r, j0), (_, j1) = first.nonzero().unbind(1), last.nonzero().unbind(1)
    idx = torch.arange(M, device=e.device)
    nxt = torch.where(e, idx, M).flip(1).cummin(dim=1).values.flip(1)  # first match at or after i
    prv = torch.where(e, idx, -1).cummax(dim=1).values  # last match at or before i
    a, b = nxt[r, j0], prv[r, j1 + p - 1]
    keep = (a <= b) & (b - a + 1 + p >= need)
    if not bool(keep.any()):
        return empty, []
    r, a, b = r[keep], a[keep], b[keep]
    d = torch.zeros(R, M + 1, dtype=torch.int32, device=e.device)
    ones = torch.ones_like(a, dtype=torch.int32)
    d.index_put_((r, a), ones, accumulate=True)
    d.index_put_((r, b + 1), -ones, accumulate=True)
    ceq = (d.cumsum(dim=1)[:, :M] > 0) & e
    empty[:, :M] |= ceq
    empty[:, p:] |= ceq
    return empty, (list(zip(r.tolist(), a.tolist(), b.tolist())) if want else [])


def _scan(
    x: torch.Tensor, ignorable: torch.Tensor | None, prm: LoopParams, want_spans: bool
) -> tuple[torch.Tensor, list[tuple[int, int, int, int, bool]]]:
    """Mark loop tokens of ``x`` [B, L]; also list candidate spans (row, start, period, length, exact).

    Pass 1 finds exact loops for p = 1..p_max; a row is skipped at period p when it has too few
    matches ``x_i = x_{i+p}`` or when all its matches already lie inside loops found at smaller
    periods (nothing new can be found there). Pass 2 looks for loops with a varying token among the
    tokens outside exact loops.
    """
    B, L = x.shape
    device = x.device
    cdtype = torch.int16 if L < 2**15 else torch.int32
    covered = torch.zeros(B, L, dtype=torch.bool, device=device)
    useful = None
    if ignorable is not None:  # prefix counts of tokens that may make up a loop unit
        useful = torch.zeros(B, L + 1, dtype=torch.int32, device=device)
        torch.cumsum(~ignorable, dim=1, dtype=torch.int32, out=useful[:, 1:])
    spans: list[tuple[int, int, int, int, bool]] = []
    p_top = min(prm.p_max, L - 1)
    for counter in (False, True):
        if counter and prm.k_counter is None:
            break
        outside = ~covered  # pass 2: tokens not in an exact loop
        for p in range(prm.counter_min_period if counter else 1, p_top + 1):
            M = L - p
            need = prm.need(p, counter)
            if need - p > M:
                continue
            eq = x[:, p:] == x[:, :M]  # eq_i: x_i == x_{i+p}, i in [0, M)
            if counter:
                eq &= outside[:, :M] & outside[:, p:]
            least = (need - p) * (p - 1) // p if counter else need - p  # matches a loop needs
            rows = (eq.sum(dim=1, dtype=torch.int32) >= least).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            e = eq[rows]
            if not counter:  # some match must touch a token that is not in a loop yet
                cv = covered[rows]
                fresh = (e & ~(cv[:, :M] & cv[:, p:])).any(dim=1)
                rows, e = rows[fresh], e[fresh]
                if rows.numel() == 0:
                    continue
            u = None if useful is None else useful[rows]
            cov, runs = (_counter if counter else _exact)(e, p, need, u, L, cdtype, want_spans)
            covered[rows] |= cov
            for r, a, b in runs:  # eq positions [a, b] -> tokens [a, b + p]
                spans.append((int(rows[r]), a, p, b - a + 1 + p, not counter))
    return covered, spans


def _run(
    completion_ids: IdsInput,
    pad_ids: Sequence[int],
    unknown_ids: Sequence[int],
    ignore_ids: Sequence[int],
    prm: LoopParams,
    want_spans: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int, bool]]]:
    x, n_tokens = _prepare(completion_ids, pad_ids, unknown_ids)
    ignorable = torch.isin(x, torch.as_tensor(list(ignore_ids), device=x.device)) if len(ignore_ids) else None
    covered, spans = _scan(x, ignorable, prm, want_spans)
    return covered, n_tokens, spans


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
    ``counter_min_period``).

    Cheap enough to call on partly decoded batches at every denoising step (pass the mask token in
    ``unknown_ids``); runs on the device of ``completion_ids``.
    """
    covered, n_tokens, _ = _run(completion_ids, pad_ids, unknown_ids, ignore_ids, LoopParams(**params),
                                want_spans=False)
    fraction = covered.sum(dim=1).float() / n_tokens.clamp(min=1).float()
    return LoopCoverage(covered, n_tokens, fraction)


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

    Returns:
        One :class:`LoopReport` per completion: loop fraction and the spans found, each with the
        smallest period that explains it (spans found again at multiples of that period, or inside
        a span of a smaller period, are dropped; overlapping spans of unrelated periods are kept).
    """
    prm = LoopParams(p_max, k_min, min_span, k_counter, counter_min_period)
    covered, n_tokens, raw = _run(completion_ids, pad_ids, unknown_ids, ignore_ids, prm, want_spans=True)
    n_cov = covered.sum(dim=1).tolist()
    n_tok = n_tokens.tolist()
    kept: list[list[LoopSpan]] = [[] for _ in range(covered.shape[0])]
    for row, start, period, length, exact in sorted(raw, key=lambda s: (s[0], s[2], not s[4], s[1])):
        if any(s.start <= start and start + length <= s.end for s in kept[row]):
            continue  # the same tokens are already explained by a smaller period (or an exact loop)
        kept[row].append(LoopSpan(start, period, length // period, length, exact))
    return [
        LoopReport(
            fraction=(n_cov[b] / n_tok[b]) if n_tok[b] else 0.0,
            spans=tuple(sorted(kept[b], key=lambda s: s.start)),
            n_tokens=n_tok[b],
            n_covered=n_cov[b],
        )
        for b in range(covered.shape[0])
    ]
