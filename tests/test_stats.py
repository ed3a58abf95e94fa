"""McNemar exact test."""

import math

import pytest

from align.stats import mcnemar_exact


def test_mcnemar_by_hand():
    # 10 problems: b fixes 6 that a got wrong, breaks 1 that a got right.
    a = [False] * 6 + [True] + [True] * 3
    b = [True] * 6 + [False] + [True] * 3
    r = mcnemar_exact(a, b)
    assert (r["n01"], r["n10"], r["n"]) == (6, 1, 10)
    assert math.isclose(r["delta"], 0.5)
    # P(X <= 1 | Binomial(7, 1/2)) = (1 + 7) / 128; two-sided: 16 / 128
    assert math.isclose(r["p_value"], 16 / 128)


def test_mcnemar_no_discordant_pairs_and_errors():
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])
