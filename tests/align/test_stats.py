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


def test_compare_stages_pairs_accuracy_and_loops(tmp_path):
    import json

    from align.config import config_from_dict
    from align.pipeline import compare_stages, print_table

    raw = {"output_dir": str(tmp_path), "stages": ["sft"], "model": {"path": "builtin:quickstart-base"}}
    cfg = config_from_dict(raw)
    (tmp_path / "eval").mkdir()

    def write(stage, correct, loops):
        rows = [{"correct": c, "loop_fraction": f} for c, f in zip(correct, loops, strict=True)]
        (tmp_path / "eval" / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # sft: 2 of 6 right, 3 looping; grpo: 4 right (fixes 3, breaks 1), loops only on problem 5 (new)
    write("sft", [True, False, False, False, True, False], [0.5, 0.4, 0.3, 0.0, 0.0, 0.0])
    write("grpo", [True, True, True, True, False, False], [0.0, 0.0, 0.0, 0.0, 0.2, 0.0])
    stage = {"accuracy": 0.0, "mean_completion_length": 1.0, "num_problems": 6}
    report = {"stages": {"sft": dict(stage), "grpo": dict(stage)}}
    compare_stages(cfg, report)
    c = report["comparisons"]["grpo_vs_sft"]
    assert (c["n01"], c["n10"]) == (3, 1)
    assert math.isclose(c["delta"], 2 / 6)
    loops = c["loop_rate"]
    assert (loops["n01"], loops["n10"]) == (1, 3)   # one problem started looping, three stopped
    assert math.isclose(loops["delta"], (1 - 3) / 6)
    text = print_table(report)
    assert "grpo_vs_sft loop rate: -33.3 points" in text and "stopped looping 3, started 1" in text
