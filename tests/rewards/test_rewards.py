"""Reward functions: TRL calling convention, answer extraction and equivalence, format and length rewards."""

from __future__ import annotations

import json
import pickle
from fractions import Fraction

import pytest
import torch

from align.rewards import (
    AnswerAccuracy,
    CountdownAccuracy,
    LoopPenalty,
    MissingColumnError,
    RegexFormat,
    SoftOverlongPunishment,
    StepAccuracy,
    answer_phrase_format,
    answer_tag_format,
    answers_match,
    available_rewards,
    boxed_format,
    equations,
    extract_answer,
    loop_penalty,
    math_accuracy,
    normalize_answer,
    parse_number,
    resolve_reward,
    task_accuracy,
    think_answer_format,
)
from align.rewards import answers as answers_mod


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# Every built-in reward, ready to call (factories built with the arguments they need).
BUILTINS = {
    "math_accuracy": math_accuracy,
    "task_accuracy": task_accuracy,
    "think_answer_format": think_answer_format,
    "answer_tag_format": answer_tag_format,
    "boxed_format": boxed_format,
    "answer_phrase_format": answer_phrase_format,
    "regex_format": RegexFormat(r"\d+", mode="search"),
    "soft_overlong_punishment": SoftOverlongPunishment(16, 4),
    "loop_penalty": loop_penalty,
    "step_accuracy": StepAccuracy("answer"),
    "countdown": CountdownAccuracy("problem"),   # its problems in a column of their own (the others hold answers)
}
#: a Countdown problem, as data.format: countdown writes it (the ``problem`` column of the calls below).
PROBLEM = json.dumps({"numbers": [1, 4], "target": 5})


def test_builtins_cover_the_registry() -> None:
    own = {n for n in available_rewards() if not n.startswith("trl.")} - {"accuracy", "reward_model"}
    assert own == set(BUILTINS)


# ---------------------------------------------------------------- TRL calling convention


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_trl_signature_extra_columns_empty_and_chat(name: str) -> None:
    fn = BUILTINS[name]
    completions = ["The answer is 4.", "", "<think>\nhm\n</think>\n<answer>\n\\boxed{5}\n</answer>"]
    ids = [[3, 4, 5], [], [7] * 20]
    columns = {
        "answer": ["4", "5", "5"],
        "solution": ["4", "5", "5"],
        "difficulty": [1, 2, 3],
        "problem": [PROBLEM] * 3,
        "trainer_state": None,
        "log_extra": None,
        "log_metric": None,
    }
    # keyword call, exactly as TRL's GRPOTrainer makes it
    out = fn(prompts=["q1", "q2", "q3"], completions=completions, completion_ids=ids, **columns)
    assert len(out) == 3 and all(v is None or isinstance(v, float) for v in out)
    # chat-style completions give the same rewards as their text
    assert (
        fn(prompts=["q1", "q2", "q3"], completions=[chat(c) for c in completions], completion_ids=ids, **columns) == out
    )
    # an empty batch is fine
    assert fn(prompts=[], completions=[], completion_ids=[], answer=[], solution=[], problem=[]) == []


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_rewards_pickle_and_keep_their_behaviour(name: str) -> None:
    fn = BUILTINS[name]
    clone = pickle.loads(pickle.dumps(fn))
    kwargs = {
        "prompts": ["q"],
        "completions": ["x \\boxed{4} The answer is 4."],
        "completion_ids": [[1, 2]],
        "answer": ["4"],
        "problem": [PROBLEM],
    }
    assert clone(**kwargs) == fn(**kwargs)
    assert clone.__name__ == fn.__name__


def test_empty_completions_score_as_failures_not_crashes() -> None:
    assert math_accuracy(None, ["", None], answer=["1", "2"]) == [0.0, 0.0]
    assert think_answer_format(None, ["", "   "]) == [0.0, 0.0]
    assert SoftOverlongPunishment(10, 2)(None, ["", ""]) == [0.0, 0.0]


# ---------------------------------------------------------------- answer extraction paths


def test_extract_boxed_last_and_nested() -> None:
    assert extract_answer(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed{unbalanced") is None


def test_extract_answer_tags_across_lines() -> None:
    text = "<think>\nstep 1\nstep 2\n</think>\n<answer>\n  42\n</answer>"
    assert extract_answer(text, ("answer_tag",)) == "42"
    assert extract_answer("<ANSWER>a</ANSWER> <answer>b</answer>", ("answer_tag",)) == "b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7.\nThe answer is 7.", "7"),
        ("The answer is 3.5.", "3.5"),
        ("So the final answer is: $1,250. Done.", "$1,250"),
        ("Final answer: 12\nThanks!", "12"),
        ("The answer is 5. Then again the answer is 6.", "6"),
    ],
)
def test_extract_answer_phrase(text: str, expected: str) -> None:
    assert extract_answer(text, ("phrase",)) == expected


def test_extract_hash_and_order() -> None:
    assert extract_answer("work...\n#### 72", ("hash",)) == "72"
    text = r"\boxed{3} and later The answer is 5."
    assert extract_answer(text) == "3"  # math order: boxed first
    assert extract_answer(text, ("phrase", "boxed")) == "5"
    assert extract_answer("no answer here") is None
    with pytest.raises(ValueError, match="unknown answer extraction path"):
        extract_answer("x", ("nope",))


# ---------------------------------------------------------------- normalisation and equivalence


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1,234", "1234"),
        ("12.0", "12"),
        ("12.50", "12.5"),
        ("3/4", "0.75"),
        (r"\frac{3}{4}", "0.75"),
        (r"\dfrac{1}{2}", "1/2"),
        ("50%", "50"),
        (r"50\%", "50"),
        ("$12", "12"),
        (r"\$1,000.00", "1000"),
        ("**42**", "42"),
        (r"\text{7}", "7"),
        ("42 apples", "42"),
        ("-3", "-3.0"),
        ("B", "b"),
    ],
)
def test_equivalence_after_normalisation(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(("pred", "gold"), [("13", "12"), ("0.33", "1/3"), ("", "1"), (None, "1"), ("7", None)])
def test_mismatch(pred: str | None, gold: str | None) -> None:
    assert not answers_match(pred, gold)


def test_parse_number_and_normalize() -> None:
    assert parse_number(r"-\frac{6}{4}") == Fraction(-3, 2)
    assert parse_number("2.50") == Fraction(5, 2)
    assert parse_number("x + 1") is None
    assert normalize_answer(r" $\boxed{1{,}000}$ ") == "1{,}000"
    assert normalize_answer("1,000,000.") == "1000000"


def test_symbolic_answers_use_math_verify_or_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    assert answers_match(r"\sqrt{4}", "2")  # not a plain number: math_verify decides
    assert answers_match(r"\frac{\pi}{2}", r"\pi/2")
    assert not answers_match(r"\sqrt{5}", "2")
    monkeypatch.setattr(answers_mod, "_math_verify", lambda: None)  # as if math_verify were not installed
    assert not answers_match(r"\sqrt{4}", "2")
    assert answers_match("x^2 + 1", "x^2+1")  # string comparison after normalisation
    assert answers_match("3/4", "0.75")  # numbers never need math_verify


def test_symbolic_answers_in_a_worker_thread() -> None:
    import threading

    box: dict[str, bool] = {}
    thread = threading.Thread(target=lambda: box.setdefault("ok", answers_match(r"\sqrt{9}", "3")))
    thread.start()
    thread.join(60)
    assert box == {"ok": True}  # math_verify's signal-based timeout is disabled off the main thread


# ---------------------------------------------------------------- accuracy rewards


def test_math_accuracy_paths_and_columns() -> None:
    completions = [r"so \boxed{\frac{1}{2}}", "<answer>\n1,234\n</answer>", "The answer is $12.", "#### 9", "none"]
    assert math_accuracy(None, completions, answer=["0.5", "1234", "12.00", "9", "3"]) == [1.0, 1.0, 1.0, 1.0, 0.0]
    # TRL's datasets call the reference column "solution"; GSM8K-style gold solutions are reduced to the number
    assert math_accuracy(None, ["The answer is 72."], solution=["She sold 48/2 = 24...\n#### 72"]) == [1.0]
    assert math_accuracy(None, ["The answer is 3."], answer=[r"the result is \boxed{3}"]) == [1.0]


def test_missing_reference_gives_none_and_missing_column_raises() -> None:
    assert math_accuracy(None, ["The answer is 1.", "The answer is 2."], answer=[None, "2"]) == [None, 1.0]
    with pytest.raises(MissingColumnError, match="answer"):
        task_accuracy(None, ["The answer is 1."], question=["q"])
    with pytest.raises(ValueError, match="1 values for 2 completions"):
        task_accuracy(None, ["a", "b"], answer=["1"])


def test_task_accuracy_builtin_format() -> None:
    completions = [
        "12 + 30 = 42.\nThe answer is 42.",
        "The answer is 41.",
        r"\boxed{7} ... The answer is 8.",  # the task's own phrase wins over an earlier box
        [{"role": "assistant", "content": "7 * 6 = 42. The answer is 42."}],
    ]
    assert task_accuracy(None, completions, answer=[42, "42", "8", 42]) == [1.0, 0.0, 1.0, 1.0]


def test_answer_accuracy_custom_values_and_validation() -> None:
    acc = AnswerAccuracy("gold", ("phrase",), correct=2.0, wrong=-1.0, name="acc")
    assert acc(None, ["The answer is 3.", "The answer is 4."], gold=["3", "3"]) == [2.0, -1.0]
    with pytest.raises(ValueError, match="unknown extraction path"):
        AnswerAccuracy(order=("boxed", "guess"))


# ---------------------------------------------------------------- format rewards (multi-line)


def test_think_answer_format_multiline() -> None:
    good = "<think>\nFirst, 3 + 4 = 7.\nThen 7 * 2 = 14.\n</think>\n<answer>\n14\n</answer>\n"
    assert think_answer_format(None, [good]) == [1.0]
    assert think_answer_format(None, [chat(good)]) == [1.0]
    bad = [
        "<think>\nreasoning\n</think>\n14",  # no answer block
        "<answer>14</answer>",  # no reasoning
        "<think>a</think><think>b</think><answer>1</answer>",  # nested/extra think blocks
        "<think>\na\n</think>\n<answer>1</answer>\ntrailing text",
    ]
    assert think_answer_format(None, bad) == [0.0] * 4


def test_other_format_rewards() -> None:
    assert answer_tag_format(None, ["text <answer>\nmulti\nline\n</answer> more", "<answer>"]) == [1.0, 0.0]
    assert boxed_format(None, [r"thus \boxed{12}", r"\boxed{}", "12"]) == [1.0, 0.0, 0.0]
    assert answer_phrase_format(None, ["Step 1.\nStep 2.\nThe answer is 1,024.", "The answer is 12 apples."]) == [
        1.0,
        0.0,
    ]


def test_regex_format_options_and_errors() -> None:
    f = RegexFormat(r"step \d+.*done", mode="search", flags=["IGNORECASE"], reward=0.5, penalty=-0.5)
    assert f(None, ["STEP 1\nthen\nDONE", "nothing"]) == [0.5, -0.5]
    assert RegexFormat(r"a.b", mode="fullmatch")(None, ["a\nb"]) == [1.0]  # DOTALL is always on
    with pytest.raises(ValueError, match="invalid regular expression"):
        RegexFormat("(")
    with pytest.raises(ValueError, match="unknown regex flags"):
        RegexFormat("a", flags=["DOTALLX"])
    with pytest.raises(ValueError, match="mode"):
        RegexFormat("a", mode="find")  # type: ignore[arg-type]


# ---------------------------------------------------------------- length shaping


def test_soft_overlong_punishment_formula() -> None:
    f = SoftOverlongPunishment(max_completion_length=100, soft_punish_cache=20)
    lengths = [0, 80, 81, 90, 100, 101]
    out = f(None, ["x"] * 6, [[1] * n for n in lengths])
    assert out == pytest.approx([0.0, 0.0, -1 / 20, -0.5, -1.0, -1.0])
    # agrees with TRL's implementation of the same formula
    from trl.rewards import get_soft_overlong_punishment

    trl_f = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    assert trl_f(completion_ids=[[1] * n for n in lengths]) == pytest.approx(out)


def test_soft_overlong_pad_text_scale_and_truncation() -> None:
    f = SoftOverlongPunishment(10, 4, pad_ids=(0,), scale=2.0)
    assert f(None, ["a"], torch.tensor([[5] * 8 + [0] * 8])) == pytest.approx([-1.0])  # |y| = 8: 2 * (6-8)/4
    assert f(None, ["w " * 9]) == pytest.approx([-1.5])  # no ids: whitespace words
    assert SoftOverlongPunishment(10, 0, truncated_penalty=-3.0)(None, ["a"], [[1] * 10]) == [-3.0]
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(10, 11)
    with pytest.raises(ValueError, match="max_completion_length"):
        SoftOverlongPunishment(0, 0)


def test_resolve_builds_the_same_rewards() -> None:
    assert resolve_reward("loop_penalty", p_max=8).p_max == 8
    assert isinstance(resolve_reward("loop_penalty"), LoopPenalty)
    assert resolve_reward("task_accuracy")(None, ["The answer is 2."], answer=["2"]) == [1.0]


# ---------------------------------------------------------------- process reward


def test_equations_are_read_in_order_and_normalised() -> None:
    assert equations("7 + 5 = 12. 12 - 3 = 9. 3 x 4 = 12 and <<1,200/2=600>>") == [
        (7, "+", 5, 12), (12, "-", 3, 9), (3, "*", 4, 12), (1200, "/", 2, 600)]
    assert equations("no maths here") == []


def test_step_accuracy_gives_partial_credit_in_place() -> None:
    ref = "7 + 5 = 12. 12 - 3 = 9. The answer is 9."
    fn = StepAccuracy()
    got = fn(["p"] * 5, [ref, "7 + 5 = 12. 12 - 4 = 8. The answer is 8.", "7 + 5 = 13.",
                         "7 + 5 = 12. 12 - 3 = 9. 9 * 2 = 18.", ""], completion=[ref] * 5)
    assert got == [1.0, 0.5, 0.0, pytest.approx(2 / 3), 0.0]
    # a reference without equations gives no reward; a missing column names itself
    assert fn(["p"], ["1 + 1 = 2."], completion=["The answer is 2."]) == [None]
    with pytest.raises(MissingColumnError, match="completion"):
        fn(["p"], ["x"], answer=["1"])
    with pytest.raises(ValueError, match="2 values for 1"):
        fn(["p"], ["x"], completion=["1 + 1 = 2.", "2 + 2 = 4."])
    assert resolve_reward("step_accuracy", reference_column="solution")(
        ["p"], [chat("2 + 2 = 4.")], solution=["2 + 2 = 4."]) == [1.0]
