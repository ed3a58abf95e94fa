"""Paired significance test for accuracy differences between two stages on the same problems."""

from __future__ import annotations

import math


def mcnemar_exact(a_correct: list[bool], b_correct: list[bool]) -> dict[str, float | int]:
    """Exact two-sided McNemar test of ``b`` against ``a`` on the same problems.

    Only discordant pairs carry information: ``n01`` (a wrong, b right) and ``n10`` (a right, b wrong).
    Under the null both are equally likely, so ``min(n01, n10) ~ Binomial(n01 + n10, ½)``; the p-value is
    twice its lower tail (capped at 1).

    Returns:
        ``{"n": problems, "delta": acc_b − acc_a, "n01": ..., "n10": ..., "p_value": ...}``.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired test needs equal lengths, got {len(a_correct)} and {len(b_correct)}")
    n = len(a_correct)
    n01 = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if not x and y)
    n10 = sum(1 for x, y in zip(a_correct, b_correct, strict=True) if x and not y)
    m, k = n01 + n10, min(n01, n10)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m if m else 1.0
    delta = (sum(b_correct) - sum(a_correct)) / n if n else 0.0
    return {"n": n, "delta": delta, "n01": n01, "n10": n10, "p_value": min(1.0, 2 * tail)}
