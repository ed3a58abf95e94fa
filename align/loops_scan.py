"""The two token-id scans behind :func:`align.loops.detect_loops` (``docs/concepts.md`` §6).

* :func:`scan_periodic`: exact loops of period ``p <= p_max`` and loops with one varying token per copy
  (the counter rule), one vectorised pass per period.
* :func:`scan_copies`: copies of longer blocks at any distance (long units, a few copies with other
  tokens between them, near copies whose tokens vary here and there), one pass for all distances: every
  ``w``-gram is hashed, each position is linked to the nearest earlier occurrence of its ``w``-gram, and
  runs of links at one distance, bridged across short gaps, are the copies.

Both take ``x`` [B, L] in which positions that are not tokens hold distinct negative sentinels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.loops import LoopParams

__all__ = ["scan_copies", "scan_periodic"]

_MOD = 2_147_483_647  # 2**31 - 1: products of two residues stay below 2**62
_BASES = (1_000_003, 998_244_353)


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


def scan_periodic(
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




def _ngram_hash(x: torch.Tensor, w: int, ignorable: torch.Tensor | None) -> torch.Tensor:
    """``h[b, i]``: a 62-bit hash of ``x[b, i : i + w]``; windows with a sentinel (or made only of ignorable
    tokens) get distinct negative values, so they equal nothing."""
    B, L = x.shape
    M = L - w + 1
    v = x.clamp(min=0) + 1
    h1 = torch.zeros(B, M, dtype=torch.long, device=x.device)
    h2 = torch.zeros_like(h1)
    for t in range(w):
        h1 = (h1 * _BASES[0] + v[:, t : t + M]) % _MOD
        h2 = (h2 * _BASES[1] + v[:, t : t + M]) % _MOD
    bad = torch.zeros(B, L + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(x < 0, dim=1, dtype=torch.int32, out=bad[:, 1:])
    drop = (bad[:, w:] - bad[:, :M]) > 0
    if ignorable is not None:
        ign = torch.zeros_like(bad)
        torch.cumsum(ignorable, dim=1, dtype=torch.int32, out=ign[:, 1:])
        drop |= (ign[:, w:] - ign[:, :M]) == w
    pos = torch.arange(M, device=x.device)
    return torch.where(drop, -(pos + 1), h1 * 2**31 + h2)


def _nearest_previous(h: torch.Tensor) -> torch.Tensor:
    """``d[b, i] = i - j`` for the nearest ``j < i`` with ``h[b, j] == h[b, i]``, 0 when there is none."""
    sh, idx = torch.sort(h, dim=1, stable=True)  # equal hashes keep increasing positions
    prev = torch.full_like(h, -1)
    prev.scatter_(1, idx[:, 1:], torch.where(sh[:, 1:] == sh[:, :-1], idx[:, :-1], -1))
    pos = torch.arange(h.shape[1], device=h.device)
    return torch.where(prev >= 0, pos - prev, 0)


def scan_copies(x: torch.Tensor, ignorable: torch.Tensor | None, w: int, gap: int, min_span: int,
                k: int) -> torch.Tensor:
    """Tokens of ``x`` [B, L] inside ``>= k`` copies of a block (``docs/concepts.md`` §6, "Copies").

    Position ``i`` (the ``w``-gram starting there) is *anchored* at distance ``d_i`` when the nearest
    earlier occurrence of its ``w``-gram is ``d_i`` positions back. A position between two anchors at the
    same distance ``D`` at most ``gap + 1`` apart is *bridged* at ``D`` (a varying token breaks the ``w``
    ``w``-grams that hold it). A maximal run of anchored or bridged positions at one distance is a copy
    of the tokens ``D`` back; it counts when its anchored positions plus ``w - 1`` reach ``min_span``
    (bridged positions extend a copy but do not count towards its length). Following
    counted links back from a position ``k - 1`` times reaches ``k`` copies; all of their tokens are marked.
    """
    B, L = x.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    M = L - w + 1
    if M < 2 or min_span > L:
        return out
    d = _nearest_previous(_ngram_hash(x, w, ignorable))
    anchor = d > 0
    rows = anchor.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    d, anchor = d[rows], anchor[rows]
    pos = torch.arange(M, device=x.device).expand_as(d)
    last = torch.where(anchor, pos, -1).cummax(dim=1).values
    nxt = torch.where(anchor, pos, M).flip(1).cummin(dim=1).values.flip(1)
    d_last = d.gather(1, last.clamp(min=0))
    d_next = d.gather(1, nxt.clamp(max=M - 1))
    bridged = (last >= 0) & (nxt < M) & (d_last == d_next) & (nxt - last <= gap + 1)
    lag = torch.where(anchor, d, torch.where(bridged, d_last, 0))
    linked = lag > 0
    start = linked.clone()
    start[:, 1:] &= ~(linked[:, :-1] & (lag[:, :-1] == lag[:, 1:]))
    end = linked.clone()
    end[:, :-1] &= ~(linked[:, 1:] & (lag[:, 1:] == lag[:, :-1]))
    first = torch.where(start, pos, -1).cummax(dim=1).values
    final = torch.where(end, pos, M).flip(1).cummin(dim=1).values.flip(1)
    n_anch = torch.zeros(d.shape[0], M + 1, dtype=torch.int32, device=x.device)
    torch.cumsum(anchor & linked, dim=1, dtype=torch.int32, out=n_anch[:, 1:])
    # anchored (not bridged) positions in each run
    matched = n_anch.gather(1, final.clamp(max=M - 1) + 1) - n_anch.gather(1, first.clamp(min=0))
    counted = linked & (matched + w - 1 >= min_span)
    target = pos - torch.where(counted, lag, 0)
    deep = counted
    for _ in range(k - 2):  # deep: i is at least the (j + 2)-th copy
        deep = counted & deep.gather(1, target)
    marked = deep.clone()
    step = deep.int()
    for _ in range(k - 1):  # walk the links back, marking every earlier copy
        back = torch.zeros_like(step)
        back.scatter_reduce_(1, target, step, reduce="amax")
        step = back
        marked |= step > 0
    diff = torch.zeros(rows.numel(), L + 1, dtype=torch.int32, device=x.device)
    diff[:, :M] += marked.int()
    diff[:, w : w + M] -= marked.int()
    out[rows] = diff.cumsum(dim=1)[:, :L] > 0
    return out
