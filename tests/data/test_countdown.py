"""Countdown rows (``data.format: countdown``): the training prompt is the evaluation prompt, the answer is the
problem the ``countdown`` reward and checker read, and a row that is not a Countdown problem is a bad row named with
its file and line, as every other bad row is."""

import json
from pathlib import Path

import pytest

from align.cli import build_parser, main
from align.cli.eval_problems import load_problems
from align.config import ConfigError, config_from_dict
from align.data.checks import BadRowsError, read_rows
from align.data.countdown import COUNTDOWN_PROMPT, countdown_problem, countdown_row, countdown_rows
from align.data.formatting import DataFormatError
from align.evaluate import build_checker
from align.pipeline.recipe import check_data, eval_checker, load_splits

#: the shapes a Countdown row comes in: d1's test file, the nums / target lists of the training sets, CSV-like text.
ROWS = [{"input": "44,19,35", "output": 98}, {"nums": [3, 5, 7], "target": 22},
        {"numbers": ["25", "4", "3"], "target": "97"}, {"input": " 8, 2 ,5", "output": 21.0, "id": 7}]
PROBLEMS = [([44, 19, 35], 98), ([3, 5, 7], 22), ([25, 4, 3], 97), ([8, 2, 5], 21)]
SOLUTIONS = ["44 + 19 + 35", "3 * 5 + 7", "25 * 4 - 3", "(8 * 2) + 5"]


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _recipe(tiny_init_config, train: Path, test: Path | None = None, **data) -> dict:
    return {"model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"}, "stages": ["grpo"],
            "data": {"task": None, "format": "countdown", "train_files": [str(train)],
                     "eval_files": [str(test or train)], **data},
            "grpo": {"num_generations": 2, "per_device_train_batch_size": 2,
                     "rewards": [{"name": "countdown"}, {"name": "loop_penalty"}]}}


def test_training_reads_the_prompt_evaluation_builds(tmp_path, tiny_init_config):
    path = _write(tmp_path / "countdown.jsonl", ROWS)
    cfg = config_from_dict(_recipe(tiny_init_config, path))
    train, test = load_splits(cfg)
    expected = [COUNTDOWN_PROMPT.format(numbers=n, target=t) for n, t in PROBLEMS]
    assert train["prompt"] == expected == test["prompt"]
    assert train["id"] == [None, None, None, 7] and train["input"][0] == "44,19,35"   # the rows' own columns stay
    assert [json.loads(a) for a in train["answer"]] == [{"numbers": n, "target": t} for n, t in PROBLEMS]
    assert expected[0] == ("Using the numbers [44, 19, 35], write an arithmetic expression that equals 98. Use "
                           "each number exactly once and only +, -, * and /. Give the expression, without '=', in "
                           "\\boxed{}.")
    # dlm-align eval --format countdown builds the same prompts and answers from the same file
    args = build_parser().parse_args(["eval", "--data", str(path), "--format", "countdown"])
    problems = load_problems(args, None, None)
    assert problems.prompts == train["prompt"] and problems.answers == train["answer"]
    assert problems.checker == "countdown" == eval_checker(cfg)
    # ... and a recipe's held-out rows are scored by the countdown checker, in the pipeline and in dlm-align eval
    args = build_parser().parse_args(["eval", "--recipe", "unused"])
    from_recipe = load_problems(args, cfg, "recipe.yaml")
    assert from_recipe.prompts == train["prompt"] and from_recipe.checker == "countdown"
    check = build_checker(eval_checker(cfg))
    assert all(check(f"\\boxed{{{s}}}", a)[1] for s, a in zip(SOLUTIONS, train["answer"], strict=True))
    assert eval_checker(config_from_dict({**_recipe(tiny_init_config, path), "data": {"task": "arithmetic"}})) \
        == "math_accuracy"


def test_the_system_prompt_goes_in_front_of_the_built_prompt(tmp_path, tiny_init_config):
    path = _write(tmp_path / "countdown.jsonl", ROWS[:1])
    cfg = config_from_dict(_recipe(tiny_init_config, path, system_prompt="Think, then answer."))
    from align.pipeline.recipe import _eval_rows

    prompts, _ = _eval_rows(cfg, load_splits(cfg)[1])
    assert prompts == [[{"role": "system", "content": "Think, then answer."},
                        {"role": "user", "content": COUNTDOWN_PROMPT.format(numbers=[44, 19, 35], target=98)}]]


#: bad Countdown rows: (row, field, kind, a word of the reason).
BAD = [
    ({"output": 98}, "input", "missing field", "needs numbers in 'input' or 'nums' or 'numbers'"),
    ({"input": "3,5,7"}, "output", "missing field", "needs a target in 'output' or 'target'"),
    ({"input": None, "output": 3}, "input", "null field", "field 'input' is null"),
    ({"nums": [3, 5], "target": None}, "target", "null field", "field 'target' is null"),
    ({"input": "", "output": 3}, "input", "empty string", "field 'input' is empty"),
    ({"nums": [], "target": 3}, "nums", "empty string", "field 'nums' is an empty list"),
    ({"input": "3,x,7", "output": 3}, "input", "wrong type", "must hold non-negative integers, got '3,x,7'"),
    ({"nums": [3.5, 2], "target": 3}, "nums", "wrong type", "must hold non-negative integers"),
    ({"nums": [3, -2], "target": 3}, "nums", "wrong type", "must hold non-negative integers"),
    ({"nums": [3, True], "target": 3}, "nums", "wrong type", "must hold non-negative integers"),
    ({"numbers": {"a": 3}, "target": 3}, "numbers", "wrong type", "must be comma-separated integers or a list"),
    ({"input": "3,5", "output": "eight"}, "output", "wrong type", "field 'output' must be an integer, got 'eight'"),
    ({"input": "3,5", "output": 2.5}, "output", "wrong type", "must be an integer, got 2.5"),
    ({"input": "3,5", "output": [8]}, "output", "wrong type", "must be an integer"),
]


@pytest.mark.parametrize("row,field,kind,reason", [
    *BAD, ({"input": "3,5", "output": 8, "answer": "3 + 5"}, "answer", "invalid row", "has its own 'answer' column"),
    ({"input": "3,5", "output": 8, "prompt": "?"}, "prompt", "invalid row", "has its own 'prompt' column")])
def test_a_row_that_is_no_countdown_problem_is_named(row, field, kind, reason):
    with pytest.raises(DataFormatError) as err:
        countdown_row(row, "train.jsonl:3")
    assert str(err.value).startswith("train.jsonl:3: ") and reason in str(err.value)
    assert (err.value.field, err.value.kind) == (field, kind)
    if field not in ("prompt", "answer"):
        with pytest.raises(DataFormatError):
            countdown_problem(row, "train.jsonl:3")


def test_bad_rows_follow_data_bad_rows_with_their_lines(tmp_path, tiny_init_config, caplog):
    lines = [ROWS[0], BAD[0][0], "{not json", ROWS[1], BAD[6][0], ROWS[2]]
    train = _write(tmp_path / "train.jsonl", lines)
    test = _write(tmp_path / "test.jsonl", [ROWS[3], BAD[11][0]])
    raw = countdown_rows(read_rows([str(train)]))
    assert [r["prompt"].split(",")[0] for r in raw.rows] == ["Using the numbers [44", "Using the numbers [3",
                                                             "Using the numbers [25"]
    assert raw.places == [f"{train}:1", f"{train}:4", f"{train}:6"] and raw.read == 6
    assert [(p.where, p.kind, p.after) for p in raw.problems] == [(f"{train}:2", "missing field", 1),
                                                                  (f"{train}:3", "malformed JSON", 1),
                                                                  (f"{train}:5", "wrong type", 2)]
    cfg = config_from_dict(_recipe(tiny_init_config, train, test))
    with pytest.raises(BadRowsError) as err:
        check_data(cfg, None)
    text = str(err.value)
    assert "4 bad row(s) of 8 (1 malformed JSON, 1 missing field, 2 wrong type)" in text
    for where in (f"{train}:2: a countdown row needs numbers", f"{train}:3: not valid JSON",
                  f"{train}:5: field 'input' must hold", f"{test}:2: field 'output' must be an integer"):
        assert where in text
    assert "data.bad_rows: skip" in text
    skip = config_from_dict(_recipe(tiny_init_config, train, test, bad_rows="skip"))
    kept, held_out, stats = check_data(skip, None)
    assert len(kept) == 3 and len(held_out) == 1 and stats["grpo"].kept == 3
    assert "left out (data.bad_rows: skip)" in caplog.text


def test_the_eval_cli_names_bad_countdown_rows(tmp_path, capsys):
    path = _write(tmp_path / "cd.jsonl", [ROWS[0], BAD[7][0]])
    assert main(["eval", "--data", str(path), "--format", "countdown", "--model", "builtin:quickstart-base",
                 "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert f"{path}:2: field 'nums' must hold non-negative integers" in err


@pytest.mark.parametrize("data,stages,needle", [
    ({"task": "arithmetic", "train_files": None}, ["grpo"], "'data.format' is 'countdown', which reads Countdown rows"),
    ({"prompt_column": "question"}, ["grpo"], "'data.prompt_column' does not apply with 'data.format' countdown"),
    ({"answer_column": "output"}, ["grpo"], "'data.answer_column' does not apply with 'data.format' countdown"),
    ({"messages_column": "chat"}, ["grpo"], "'data.messages_column' does not apply"),
    ({}, ["sft", "grpo"], "the 'sft' stage trains on completions, and Countdown rows"),
    ({}, ["pretrain"], "the 'pretrain' stage trains on completions"),
    ({}, ["vrpo"], "so 'data.format' must be 'auto', got 'countdown'"),
])
def test_countdown_settings_that_cannot_apply_are_rejected_at_load_time(tmp_path, tiny_init_config, data, stages,
                                                                        needle):
    raw = _recipe(tiny_init_config, tmp_path / "x.jsonl")
    raw["data"].update(data)
    raw["stages"] = stages
    if "grpo" not in stages:
        del raw["grpo"]
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert needle in str(err.value)
