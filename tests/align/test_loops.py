"""Loop detection (align.loops) and the loop_penalty reward."""

from __future__ import annotations

import pickle
import random
import re

import pytest
import torch

from align.loops import LoopParams
from align.rewards import LoopPenalty, LoopSpan, detect_loops, loop_coverage, loop_penalty

PAD = 0


def ids_of(texts: list[str]) -> list[list[int]]:
    """BPE-like pre-tokenisation (a word or punctuation run with its leading space, newline runs), shared ids."""
    vocab: dict[str, int] = {}
    pattern = r" ?\w+| ?[^\w\s]+|\s+"
    return [[vocab.setdefault(t, len(vocab) + 1) for t in re.findall(pattern, s)] for s in texts]


def reference_coverage(x: list[int], p_max: int, k_min: int, min_span: int) -> list[bool]:
    """The definition, written directly: every maximal p-periodic stretch of >= need(p) tokens."""
    cov = [False] * len(x)
    for p in range(1, p_max + 1):
        need = max(k_min * p, min_span)
        i = 0
        while i + p < len(x):
            if x[i] != x[i + p]:
                i += 1
                continue
            j = i
            while j + p < len(x) and x[j] == x[j + p]:
                j += 1
            if (j - i) + p >= need:  # tokens [i, j + p) are p-periodic
                for t in range(i, j + p):
                    cov[t] = True
            i = j
    return cov


# ---------------------------------------------------------------- spans and fractions on hand-made ids


def test_single_token_loop_span_and_fraction() -> None:
    (rep,) = detect_loops([[5, 6, 7] + [9] * 30])
    assert rep.spans == (LoopSpan(start=3, period=1, repeats=30, length=30),)
    assert rep.n_tokens == 33 and rep.n_covered == 30
    assert rep.fraction == pytest.approx(30 / 33)
    assert rep.has_loop


def test_sentence_loop_reports_smallest_period_and_partial_copy() -> None:
    unit = [11, 12, 13, 14, 15, 16, 17, 18]
    x = [1, 2, 3, 4] + unit * 5 + unit[:3]  # 5 copies, then a partial one, to the end
    (rep,) = detect_loops([x])
    assert rep.spans == (LoopSpan(start=4, period=8, repeats=5, length=43),)  # multiples of 8 are dropped
    assert rep.fraction == pytest.approx(43 / 47)


def test_two_loops_of_different_periods() -> None:
    x = [1] + [7] * 25 + [2, 3] + [4, 5, 6] * 9 + [8]
    (rep,) = detect_loops([x])
    assert [(s.start, s.period, s.repeats, s.length) for s in rep.spans] == [(1, 1, 25, 25), (28, 3, 9, 27)]
    assert rep.n_covered == 52


def test_threshold_is_exactly_need_tokens() -> None:
    # period 2: need = max(3 * 2, min_span) = 24 tokens
    hit = detect_loops([[1] + [4, 5] * 12 + [9]])[0]
    miss = detect_loops([[1] + [4, 5] * 11 + [4] + [9]])[0]  # 23 periodic tokens
    assert hit.has_loop and hit.spans[0].length == 24
    assert not miss.has_loop
    # long periods need k_min copies: 3 x 10 = 30 tokens
    unit = list(range(20, 30))
    assert detect_loops([unit * 3])[0].has_loop
    assert not detect_loops([unit * 2 + unit[:9]])[0].has_loop


def test_trailing_pad_is_never_a_loop() -> None:
    text = [3, 4, 5, 6, 7, 8]
    (rep,) = detect_loops([text + [PAD] * 100], pad_ids=(PAD,))
    assert not rep.has_loop and rep.n_tokens == len(text) and rep.fraction == 0.0
    # without telling it the pad id the run of pads is a loop: pad_ids is what protects it
    assert detect_loops([text + [PAD] * 100])[0].has_loop
    # several pad ids (EOS, EOT), only the trailing run is cut
    (rep,) = detect_loops([[9] * 30 + text + [1, 2, 1, 1, 2] * 10], pad_ids=(1, 2))
    assert rep.n_tokens == 36 and rep.spans == (LoopSpan(0, 1, 30, 30),)


def test_loop_that_runs_into_the_padding_stops_at_the_last_token() -> None:
    x = torch.tensor([[1, 2] + [6] * 30 + [PAD] * 20])
    (rep,) = detect_loops(x, pad_ids=(PAD,))
    assert rep.spans == (LoopSpan(2, 1, 30, 30),) and rep.n_tokens == 32


def test_tensor_and_ragged_list_inputs_agree() -> None:
    rows = [[1, 2, 3] + [8] * 40, [5, 6] * 20, [4, 5, 6, 7], []]
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    a = detect_loops([torch.tensor(r, dtype=torch.long) for r in rows])
    b = detect_loops(padded, pad_ids=(PAD,))
    assert a == b
    assert a[3].n_tokens == 0 and a[3].fraction == 0.0 and a[3].spans == ()


def test_empty_batch() -> None:
    assert detect_loops([]) == []
    assert loop_coverage(torch.zeros(0, 5, dtype=torch.long)).fraction.shape == (0,)


def test_matches_the_reference_definition_on_random_sequences() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        x = [rng.randrange(4) for _ in range(rng.randrange(5, 90))]  # small alphabet: many chance repeats
        if rng.random() < 0.5:
            s, p = rng.randrange(len(x)), rng.randint(1, 9)
            x[s:] = (x[s : s + p] * 100)[: len(x) - s]
        rows.append(x)
    for p_max, k_min, min_span in [(8, 3, 1), (5, 2, 7), (12, 3, 24)]:
        cov = loop_coverage(rows, p_max=p_max, k_min=k_min, min_span=min_span, k_counter=None, copy_min_span=None)
        for b, x in enumerate(rows):
            expect = reference_coverage(x, p_max, k_min, min_span)
            assert cov.covered[b, : len(x)].tolist() == expect
            assert cov.fraction[b].item() == pytest.approx(sum(expect) / len(x))


def test_loop_coverage_matches_detect_loops() -> None:
    x = torch.tensor([[1, 2] + [3, 4, 5] * 12 + [6] * 4, [7] * 30 + [8] * 12])
    reports = detect_loops(x)
    cov = loop_coverage(x)
    assert cov.covered.sum(dim=1).tolist() == [r.n_covered for r in reports]
    assert cov.fraction.tolist() == pytest.approx([r.fraction for r in reports])


# ---------------------------------------------------------------- partly decoded sequences, ignore ids


def test_unknown_ids_break_loops_and_leave_the_denominator() -> None:
    MASK = 99
    x = [5] * 20 + [MASK] + [5] * 20 + [MASK] * 9
    (rep,) = detect_loops([x], unknown_ids=(MASK,), k_counter=None, copy_min_span=None)
    assert rep.n_tokens == 40 and not rep.has_loop  # two exact runs of 20 < 24: the mask matches nothing
    # one unknown inside a long loop is tolerated like a varying token (counter rule) and not counted
    unit = list(range(10, 20))
    y = unit * 3 + unit[:5] + [MASK] + unit[6:] + unit * 3  # exact runs of 35 and 34 tokens
    assert not detect_loops([y], unknown_ids=(MASK,), k_min=5, k_counter=None, copy_min_span=None)[0].has_loop
    (rep,) = detect_loops([y], unknown_ids=(MASK,), k_min=5, copy_min_span=None)
    assert rep.has_loop and rep.n_covered == rep.n_tokens == 69 and rep.fraction == 1.0
    (rep,) = detect_loops([[5] * 30 + [MASK] * 10], unknown_ids=(MASK,))
    assert rep.fraction == 1.0


def test_ignore_ids_units_made_only_of_them_are_not_loops() -> None:
    NL, SP = 50, 51
    blank = [NL, SP] * 20
    assert detect_loops([[1, 2, *blank]])[0].has_loop
    assert not detect_loops([[1, 2, *blank]], ignore_ids=(NL, SP))[0].has_loop
    # a unit with a real token in it still counts
    assert detect_loops([[7, NL] * 20], ignore_ids=(NL, SP))[0].has_loop


# ---------------------------------------------------------------- counters


def test_counter_loop_needs_k_counter_copies() -> None:
    x = [1, 2]
    for c in range(8):  # "Step c: the same sentence." x 8
        x += [10, 100 + c, 11, 12, 13, 14, 15, 16, 17, 18]
    (rep,) = detect_loops([x], copy_min_span=None)
    assert rep.has_loop and rep.spans == (LoopSpan(2, 10, 8, 80, exact=False),)
    assert rep.n_covered == 8 * 10 - 8  # the counter tokens themselves are not counted
    assert not detect_loops([x], k_counter=None, copy_min_span=None)[0].has_loop
    assert not detect_loops([x[: 2 + 5 * 10]], copy_min_span=None)[0].has_loop  # 5 copies < k_counter = 6
    assert not detect_loops([x], counter_min_period=11, copy_min_span=None)[0].has_loop  # units < 11 tokens
    # the copy rule bridges the counter: 8 near copies of a 10-token unit are a loop without the counter rule
    assert detect_loops([x], k_counter=None)[0].has_loop


def test_numbered_list_with_different_items_is_not_a_loop() -> None:
    x = []
    for c in range(12):
        x += [10, 100 + c, 11, 200 + 3 * c, 201 + 3 * c, 202 + 3 * c, 12, 13, 14, 15]
    assert not detect_loops([x])[0].has_loop


# ---------------------------------------------------------------- the copy rule


def test_long_unit_beyond_p_max_is_found_by_the_copy_rule() -> None:
    unit = list(range(100, 160))  # a 60-token attempt, 4 copies: longer than any period p_max = 32
    x = [1, 2, 3] + unit * 4
    assert not detect_loops([x], copy_min_span=None)[0].has_loop
    (rep,) = detect_loops([x])
    assert rep.n_covered == 240 and rep.spans == (LoopSpan(3, 0, 1, 240, exact=False, kind="copies"),)


def test_copies_apart_count_and_two_copies_do_not() -> None:
    block = list(range(100, 130))
    three = [1, *block, 2, 3, *block, 4, 5, 6, *block, 7]
    (rep,) = detect_loops([three])
    assert rep.n_covered == 90 and [s.length for s in rep.spans] == [30, 30, 30]
    assert not detect_loops([[1, *block, 2, 3, *block, 7]])[0].has_loop
    assert not detect_loops([three], k_min=4)[0].has_loop


def test_near_copies_are_bridged_but_bridges_do_not_count_towards_the_span() -> None:
    body = list(range(100, 120))
    x = [1]
    for c in range(4):  # "Step c: <the same 20 tokens>" four times
        x += [50, 60 + c, *body]
    assert detect_loops([x], k_counter=None)[0].has_loop
    assert not detect_loops([x], k_counter=None, copy_gap=4)[0].has_loop  # a varying token breaks 6 n-grams
    # a short shared template with a varying token between two 8-token halves is not a copy
    y = []
    for c in range(4):
        y += list(range(100, 108)) + [60 + c] + list(range(110, 118)) + [200 + 10 * c + t for t in range(6)]
    assert not detect_loops([y], k_counter=None)[0].has_loop


def test_copy_rule_respects_unknown_and_ignored_tokens() -> None:
    MASK, NL = 99, 50
    block = list(range(100, 130))
    x = [1] + block + [2] + block + [3] + [MASK] * 30
    assert not detect_loops([x], unknown_ids=(MASK,))[0].has_loop  # the third copy is not decoded yet
    x[63:93] = block
    assert detect_loops([x], unknown_ids=(MASK,))[0].has_loop
    blank = [NL] * 12
    assert not detect_loops([[1, *blank, 2, *blank, 3, *blank]], ignore_ids=(NL,), min_span=64)[0].has_loop


# ---------------------------------------------------------------- legitimate repetition vs real loops

LEGIT = {
    "numbered list": "\n".join(
        f"{i}. {t}"
        for i, t in enumerate(
            [
                "Preheat the oven.",
                "Mix the flour and sugar.",
                "Add two eggs.",
                "Pour into the tin.",
                "Bake for 25 minutes.",
                "Let it cool.",
                "Dust with sugar.",
                "Serve warm.",
            ],
            1,
        )
    ),
    "markdown table": "| Name | Q1 | Q2 | Q3 | Q4 | Q5 |\n| --- | --- | --- | --- | --- | --- |\n"
    + "\n".join(f"| {n} | 0 | 0 | {i} | 0 | 0 |" for i, n in enumerate(["Ava", "Ben", "Cy", "Di", "Ed"])),
    "code indentation": "def f(grid):\n    for i in range(3):\n        for j in range(3):\n            if grid[i][j]:\n"
    "                grid[i][j] = 0\n            else:\n                grid[i][j] = 1\n    return grid\n",
    "repeated sum": "Four groups of three: 3 + 3 + 3 + 3 = 12, and 3+3+3+3+3+3 = 18.",
    "enumeration": "The days are Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "counting": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16.",
    "refrain": "Row, row, row your boat, gently down the stream. Merrily, merrily, merrily, merrily.",
}
LOOPS = {
    "single token": "The model is a " + "network " * 30,
    "sentence to the limit": "First we add. " + "The answer is 12. " * 8,
    "phrase": "It is " + "very much so, " * 12,
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legitimate_repetition_not_flagged(name: str) -> None:
    text = LEGIT[name]
    assert not detect_loops(ids_of([text]))[0].has_loop
    assert loop_penalty(None, [text]) == [0.0]


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_real_loops_flagged(name: str) -> None:
    text = LOOPS[name]
    (rep,) = detect_loops(ids_of([text]))
    assert rep.has_loop and rep.fraction > 0.5
    assert loop_penalty(None, [text])[0] < -0.5


# ---------------------------------------------------------------- loop_penalty reward


def test_loop_penalty_linear_and_threshold_shaping() -> None:
    ids = [[1, 2, 3, 4] + [9] * 36, [1, 2, 3, 4, 5]]
    assert LoopPenalty(source="ids")(None, ["a", "b"], ids) == pytest.approx([-0.9, 0.0])
    assert LoopPenalty(source="ids", scale=2.0)(None, ["a", "b"], ids) == pytest.approx([-1.8, 0.0])
    assert LoopPenalty(source="ids", shaping="threshold")(None, ["a", "b"], ids) == [-1.0, 0.0]
    assert LoopPenalty(source="ids", shaping="threshold", threshold=0.95)(None, ["a", "b"], ids) == [0.0, 0.0]


def test_loop_penalty_reads_text_by_default_ids_without_text_and_both() -> None:
    completions = ["hello world", "network " * 30]
    ids = [[5] * 40, [1, 2, 3]]  # deliberately the opposite of the text
    assert loop_penalty(None, completions, ids) == [0.0, -1.0]  # auto: the text when the trainer passes it
    assert loop_penalty(None, completions) == [0.0, -1.0]
    assert loop_penalty(None, None, ids) == [-1.0, 0.0]  # auto without text: the ids
    assert loop_penalty.fractions(completions, ids, source="ids") == [1.0, 0.0]
    assert LoopPenalty(source="ids")(None, completions, ids) == [-1.0, 0.0]
    assert LoopPenalty(source="text")(None, completions, ids) == [0.0, -1.0]
    assert LoopPenalty(source="both")(None, completions, ids) == [-1.0, -1.0]
    with pytest.raises(ValueError, match="source='ids'"):
        LoopPenalty(source="ids")(None, completions)


def test_loop_penalty_scores_a_real_kind_of_loop_the_old_penalty_missed() -> None:
    attempt = ("Let's try 84 and 53 in a different way: 84 - 53 = 31, and 31 + 53 = 84, which is not 57. "
               "This, however, does not work, so let's try another combination of the numbers.\n")
    text = "We need 57 from 84, 88 and 53.\n" + attempt * 4
    assert loop_penalty(None, [text])[0] < -0.8
    assert LoopPenalty(source="ids", copy_min_span=None)(None, None, ids_of([text])) == [0.0]  # the old rules
    assert LoopPenalty(source="ids", copy_min_span=24)(None, None, ids_of([text]))[0] < -0.8  # copy rule on


def test_loop_penalty_cuts_trailing_pad_and_handles_tensors() -> None:
    ids = torch.tensor([[1, 2, 3] + [PAD] * 40])
    assert LoopPenalty(source="ids", pad_ids=(PAD,))(None, ["x"], ids) == [0.0]
    assert LoopPenalty(source="ids")(None, ["x"], ids)[0] < -0.9


def test_loop_penalty_empty_chat_extra_columns_and_pickle() -> None:
    chat = [[{"role": "assistant", "content": "go " * 40}], [{"role": "assistant", "content": ""}], ""]
    out = loop_penalty(prompts=["p"] * 3, completions=chat, completion_ids=None, answer=[1, 2, 3], trainer_state=None)
    assert out == [-1.0, 0.0, 0.0]
    assert loop_penalty(None, []) == []
    clone = pickle.loads(pickle.dumps(LoopPenalty(p_max=8, shaping="threshold", min_block_words=30)))
    assert clone.p_max == 8 and clone.text_params.min_block_words == 30 and clone(None, chat) == [-1.0, 0.0, 0.0]


# ---------------------------------------------------------------- input validation


def test_bad_inputs_raise_named_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        detect_loops(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        detect_loops(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        detect_loops([[1, -2, 3]])
    with pytest.raises(ValueError, match="k_min"):
        detect_loops([[1]], k_min=1)
    with pytest.raises(ValueError, match="p_max"):
        LoopParams(p_max=0)
    with pytest.raises(ValueError, match="k_counter"):
        LoopParams(k_counter=1)
    with pytest.raises(ValueError, match="shaping"):
        LoopPenalty(shaping="square")
    with pytest.raises(ValueError, match="source"):
        LoopPenalty(source="tokens")
    with pytest.raises(ValueError, match="copy_min_span"):
        LoopParams(copy_min_span=1)
    with pytest.raises(ValueError, match="copy_ngram"):
        detect_loops([[1]], copy_ngram=1)
