"""Loop detection on text (align.loops_text): hand-made loops of each kind and legitimate repetition."""

from __future__ import annotations

import re

import pytest

from align.loops import detect_loops
from align.loops_text import TextLoopParams, detect_text_loops, normalise_unit, split_units, text_word_ids

ATTEMPT = ("Let's try to use 57 and 64 in a different way. We can express 57 as 14 * 4 and 64 as 8 * 8, "
           "then add them: 57 + 64 = 121. Now we need to subtract 1 from 121 to get 6, but 121 - 1 = 120, "
           "which is not 6.\n")

# The kinds of loops real diffusion models make (bench/data/README.md).
LOOPS = {
    # a whole attempt (~60 tokens) repeated until the budget runs out: longer than any period p_max covers
    "long unit": "We need 6 from 57, 64 and 1.\n" + ATTEMPT * 4,
    # copies that differ in a list number
    "near copies (list numbers)": "Follow the steps.\n" + "".join(
        f"{i}. Try the combination of 19 and 3, 19 and 5, and 3 and 5 to see if any of them reaches the target.\n"
        for i in range(1, 6)),
    # the same equation restated under First / Next / Finally
    "near copies (First/Next/Finally)": "".join(
        f"{head}, let's try the combination of 88 and 53:\n\\[ 88 - 53 = 35 \\]\nThis is not equal to 57.\n\n"
        for head in ("First", "Next", "Next", "Finally")),
    # three copies of a block, each after a different line
    "few copies with a line between": "".join(
        f"{head}\n- 51 - 34 = 17\n- 17 - 6 = 11\n- 11 + 9 = 20\nThis does not give 4, so we try again.\n"
        for head in ("First, the combination:", "Hmm, let me check:", "Once more:")),
    # the same grid printed as rows, again as rows, then as boxes, without new content
    "structural re-printing": "Analyse the grid:\n" + "".join(
        f"{label}\n- The first {name}: 3, 0, 2, 0.\n- The second {name}: 2, 0, 0, 0.\n"
        f"- The third {name}: 1, 3, 0, 2.\n- The fourth {name}: 0, 2, 1, 0.\n"
        for label, name in (("Rows:", "row"), ("Fill:", "row"), ("Boxes:", "2x2 box"))),
    # a short unit to the budget (found on the word sequence)
    "short period": "Let's start. " + "we, " * 40,
    # a short line three times in a row (the shipped tiny model's loop at the end of a solution)
    "short line three times": "15 * 2 = 30. 30 + 6 = 30. 30 + 6 = 30. 30 + 6 = 30.",
}

# Repetition that is not a loop.
LEGIT = {
    "distinct candidate equations": "".join(
        f"Next, let's try the combination of {a} and {b}:\n\\[ {a} {op} {b} = {r} \\]\nThis is not equal to 57.\n\n"
        for a, b, op, r in ((84, 88, "+", 172), (84, 53, "+", 137), (88, 53, "-", 35), (84, 53, "-", 31),
                            (88, 53, "+", 141), (84, 88, "-", -4), (53, 84, "*", 4452))),
    "list of different steps": "\n".join(f"{i}. {t}" for i, t in enumerate((
        "Calculate the number of eggs laid per day.", "Subtract the eggs eaten for breakfast.",
        "Subtract the eggs used for muffins.", "Multiply the remaining eggs by the price.",
        "Add the earnings of every day of the week.", "Write the total in dollars."), 1)),
    "restated question": ("Janet's ducks lay 16 eggs per day. She eats three and bakes with four. "
                          "So: Janet's ducks lay 16 eggs per day. She eats three and bakes with four.\n"
                          "16 - 3 - 4 = 9 eggs are sold at $2, so she makes 9 * 2 = 18 dollars.\n"
                          "The answer is 18."),
    "final answer given twice": ("The total cost is 20 * 0.25 + 4 * 0.5 = 5 + 2 = 7 dollars.\n"
                                 "Therefore, the total amount Peter paid is 7 dollars.\n</reasoning>\n<answer>\n"
                                 "Therefore, the total amount Peter paid is 7 dollars.\n</answer>"),
    "enumeration of different cells": "".join(
        f"- Move to the next cell ({r},{c}), which is {v}.\n"
        for (r, c), v in zip([(r, c) for r in range(4) for c in range(4)],
                             [3, 1, 3, 0, 0, 0, 0, 4, 2, 2, 4, 3, 0, 0, 1, 4])),
    "rules for rows, columns and boxes": ("Each row must contain the digits 1-4 exactly once.\n"
                                          "Each column must contain the digits 1-4 exactly once.\n"
                                          "Each 2x2 box must contain the digits 1-4 exactly once.\n"),
    "a short line twice, then a different one": "17 + 9 = 26. 26 + 9 = 35. 26 + 9 = 35. 35 * 2 = 70.",
    "a short result in three different lines": "3 + 4 = 7. 7 + 7 = 14. 14 - 7 = 7. The answer is 7.",
    "a block printed twice": ("- 51 - 34 = 17\n- 17 - 6 = 11\n- 11 + 9 = 20\nThis does not give 4.\n"
                              "Let me check again.\n"
                              "- 51 - 34 = 17\n- 17 - 6 = 11\n- 11 + 9 = 20\nThis does not give 4."),
}


def bpe_ids(texts: list[str], digits: bool = False) -> list[list[int]]:
    """A stand-in tokenizer (words with their leading space, punctuation runs), optionally one token per digit."""
    vocab: dict[str, int] = {}
    pattern = r" ?\d| ?[^\W\d]+| ?[^\w\s]+|\s+" if digits else r" ?\w+| ?[^\w\s]+|\s+"
    return [[vocab.setdefault(t, len(vocab) + 1) for t in re.findall(pattern, s)] for s in texts]


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_each_kind_of_loop_is_found_on_text(name: str) -> None:
    (rep,) = detect_text_loops([LOOPS[name]])
    assert rep.has_loop and rep.fraction > 0.6


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legitimate_repetition_is_not_a_loop_on_text(name: str) -> None:
    (rep,) = detect_text_loops([LEGIT[name]])
    assert not rep.has_loop and rep.fraction == 0.0


@pytest.mark.parametrize("name", sorted(set(LOOPS) - {"structural re-printing", "short line three times"}))
def test_token_id_copy_rule_finds_the_loops_the_periodic_rule_misses(name: str) -> None:
    for digits in (False, True):
        (rep,) = detect_loops(bpe_ids([LOOPS[name]], digits))
        assert rep.has_loop
    if name != "short period":  # units longer than p_max tokens, or copies that vary or lie apart
        assert not detect_loops(bpe_ids([LOOPS[name]]), copy_min_span=None)[0].has_loop


def test_token_ids_miss_structural_re_printing_and_flag_cell_enumerations() -> None:
    # the limits of the token-id path (docs/concepts.md §6): labels of different lengths shift the copies,
    # and tiny alphabets (digits 0-4) repeat n-grams by chance; the text path gets both right
    assert not detect_loops(bpe_ids([LOOPS["structural re-printing"]]))[0].has_loop
    assert not detect_loops(bpe_ids([LOOPS["short line three times"]]))[0].has_loop  # 18 tokens < min_span 24
    assert detect_loops(bpe_ids([LEGIT["enumeration of different cells"]]))[0].has_loop
    others = sorted(set(LEGIT) - {"enumeration of different cells"})
    assert not any(r.has_loop for r in detect_loops(bpe_ids([LEGIT[k] for k in others])))


def test_normalisation_drops_markers_ordinals_and_labels_but_keeps_content_numbers() -> None:
    assert normalise_unit("3. **Fill the second row**: 0, 3, 4, 2") == (("0", "3", "4", "2"), ("fill", "the", "#"))
    assert normalise_unit("- The top-left 2x2 box: 0, 3, 4, 2.") == (("0", "3", "4", "2"), ("the",) + ("#",) * 4)
    assert normalise_unit("Step 4: Next, add 5 apples.") == (("5",), ("#", "add", "apples"))
    assert normalise_unit("1, 2, 3, 4") == (("1", "2", "3", "4"), ())  # a list of numbers is content
    assert normalise_unit(r"\[ 88 - 53 = 35 \]") == (("88", "53", "35"), ())


def test_units_are_lines_cut_into_sentences() -> None:
    text = "First line. Second sentence!\n\n  Third line without a stop\nA decimal 2.5 stays."
    assert [text[a:b] for a, b in split_units(text)] == [
        "First line.", "Second sentence!", "  Third line without a stop", "A decimal 2.5 stays."]


def test_copies_need_k_min_members_and_enough_words() -> None:
    block = "We can try placing the digits in the empty cells and check if they satisfy the Sudoku rules.\n"
    assert not detect_text_loops([block * 2])[0].has_loop  # two copies
    assert detect_text_loops([block * 3])[0].has_loop
    assert not detect_text_loops([block * 3], TextLoopParams(k_min=4))[0].has_loop
    short = "Let's try another approach.\n"  # 4 words: apart, a loop only when the copies add up
    apart = "".join(short + f"Then {a} + {b} = {a + b} is not 24.\n" for a, b in ((3, 5), (7, 9), (11, 2)))
    assert not detect_text_loops([apart])[0].has_loop
    assert detect_text_loops([apart * 4])[0].has_loop
    assert detect_text_loops([short * 3])[0].has_loop  # in a row: the word scan (18 words and marks)
    assert not detect_text_loops([block * 3], TextLoopParams(min_loop_words=60, words=False))[0].has_loop


def test_fraction_counts_non_space_characters_and_groups_hold_the_copies() -> None:
    intro = "Here is a different opening sentence.\n"
    block = "We can try placing the digits in the empty cells and check if they satisfy the Sudoku rules.\n"
    (rep,) = detect_text_loops([intro + block * 3], TextLoopParams(words=False))
    solid = sum(not c.isspace() for c in intro + block * 3)
    assert rep.n_chars == solid and rep.n_covered == solid - sum(not c.isspace() for c in intro)
    assert rep.fraction == pytest.approx(rep.n_covered / rep.n_chars)
    assert len(rep.groups) == 1 and len(rep.groups[0]) == 3
    assert detect_text_loops(["", "   "]) == [detect_text_loops([""])[0]] * 2
    assert detect_text_loops([]) == []


def test_word_scan_finds_short_loops_inside_one_line_and_can_be_switched_off() -> None:
    text = "Let's start. " + "we, " * 40
    (rep,) = detect_text_loops([text])
    assert rep.groups == () and len(rep.word_spans) == 1
    assert not detect_text_loops([text], TextLoopParams(words=False))[0].has_loop
    ids, spans = text_word_ids(["we, we", "We!"])
    assert ids == [[0, 1, 0], [0, 2]] and spans[1] == [(0, 2), (2, 3)]


def test_word_min_span_sets_the_shortest_periodic_loop_on_words() -> None:
    text = "30 + 6 = 30. " * 3  # 18 words and punctuation marks: a loop at the default, not with a longer minimum
    assert detect_text_loops([text])[0].has_loop
    assert not detect_text_loops([text], TextLoopParams(word_min_span=19))[0].has_loop
    assert not detect_text_loops(["30 + 6 = 30. " * 2])[0].has_loop  # two copies are never a loop (k_min = 3)
    with pytest.raises(ValueError, match="word_min_span"):
        TextLoopParams(word_min_span=0)


def test_bad_text_params_raise() -> None:
    with pytest.raises(ValueError, match="k_min"):
        TextLoopParams(k_min=1)
    with pytest.raises(ValueError, match="word_sim"):
        TextLoopParams(word_sim=1.5)
    with pytest.raises(ValueError, match="min_loop_words"):
        TextLoopParams(min_loop_words=0)
