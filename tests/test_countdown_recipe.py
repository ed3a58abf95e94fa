"""``llada/grpo-countdown`` end to end: the shipped recipe, as its first line runs it, on Countdown rows in d1's file
format (``{"input": "44,19,35", "output": 98}``), with a tiny native LLaDA model standing in for LLaDA-8B-Instruct in
an offline Hugging Face cache and only sizes overridden; the reward the run computes is the ``countdown`` reward of
the rows the run built, and a known solution scores 1 through the recipe's own reward entries."""

import json
import shlex
from pathlib import Path

import pytest

from align.cli import main
from align.config import load_config
from align.data.countdown import COUNTDOWN_PROMPT
from align.recipes import recipe_path

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "llada/grpo-countdown"
REPO = "GSAI-ML/LLaDA-8B-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: d1's countdown_cd3_test.jsonl format, with a solution of each (for the reward check).
ROWS = [({"input": "44,19,35", "output": 98}, "44 + 19 + 35"), ({"input": "3,5,7", "output": 22}, "3 * 5 + 7"),
        ({"input": "25,4,3", "output": 97}, "25 * 4 - 3"), ({"input": "8,2,5", "output": 21}, "8 * 2 + 5")]
#: Sizes only: a tiny model in float32 on a CPU, two optimizer steps, short rollouts and evaluation.
SIZE = ["model.dtype=float32", "model.gradient_checkpointing=false", "peft.r=8", "peft.lora_alpha=16",
        "grpo.bf16=false", "grpo.max_steps=2", "grpo.gradient_accumulation_steps=1", "grpo.logging_steps=1",
        "grpo.gen_length=32", "grpo.denoising_steps=8", "eval.gen_length=32", "eval.denoising_steps=8",
        "eval.num_problems=3", "eval.batch_size=3"]


@pytest.fixture
def countdown_files(tmp_path, offline_stand_in) -> tuple[Path, Path]:
    """Train and test files in d1's format, and the stand-in model in an offline cache under the recipe's Hub id."""
    texts = []
    for row, solution in ROWS:
        numbers = [int(x) for x in row["input"].split(",")]
        texts += [COUNTDOWN_PROMPT.format(numbers=numbers, target=row["output"]), f"\\boxed{{{solution}}}"]
    offline_stand_in(REPO, COMMIT, texts)
    train, test = tmp_path / "countdown_train.jsonl", tmp_path / "countdown_cd3_test.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row, _ in ROWS))
    test.write_text("".join(json.dumps(row) + "\n" for row, _ in ROWS[1:]))
    return train, test


def _command(train: Path, test: Path, out: Path) -> list[str]:
    """The recipe's first line with the files filled in, as arguments of ``dlm-align``, plus the sizes."""
    first = recipe_path(NAME).read_text().splitlines()[0]
    args = shlex.split(first.removeprefix("#").strip())[1:]
    assert args[:2] == ["run", NAME]
    args = [a.replace("/path/to/countdown_train.jsonl", str(train)).replace("/path/to/countdown_cd3_test.jsonl",
                                                                             str(test)) for a in args]
    assert args[2:] == [f"data.train_files=[{train}]", f"data.eval_files=[{test}]"]
    return [*args, *SIZE, f"output_dir={out}"]


def test_the_recipe_has_d1s_countdown_settings():
    cfg = load_config(recipe_path(NAME))
    opts, rest = cfg.stage_options("grpo")
    assert cfg.model.path == REPO and cfg.peft is not None and cfg.data.format == "countdown"
    assert (opts.estimator, opts.gen_length, opts.denoising_steps, opts.block_length) == ("one_step", 256, 128, 32)
    assert (opts.temperature, opts.num_generations, opts.num_iterations, opts.beta) == (0.9, 6, 8, 0.04)
    optimizer = (rest["learning_rate"], rest["weight_decay"], rest["adam_beta2"], rest["max_grad_norm"])
    assert optimizer == (3e-6, 0.1, 0.99, 0.2)
    assert [r["name"] for r in opts.rewards] == ["countdown", "loop_penalty"]
    assert cfg.eval.num_problems == 256 and Path(cfg.data.eval_files[0]).name == "countdown_cd3_test.jsonl"
    assert (cfg.eval.gen_length, cfg.eval.denoising_steps, cfg.eval.block_length) == (256, 128, 32)


def test_validate_and_run_compute_the_countdown_reward(countdown_files, tmp_path, capsys):
    train, test = countdown_files
    out = tmp_path / "run"
    args = _command(train, test, out)
    assert main(["validate", *args[1:]]) == 0
    printed = capsys.readouterr().out
    assert "grpo: 4 of 4 rows kept" in printed and "memory per GPU, stage grpo" in printed
    assert main(args) == 0

    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"base", "grpo"} and report["stages"]["grpo"]["num_problems"] == 3
    logs = [r for r in json.loads((out / "grpo" / "log_history.json").read_text()) if "rewards/countdown/mean" in r]
    assert logs, "no countdown reward was logged"
    for r in logs:
        assert 0.0 <= r["rewards/countdown/mean"] <= 1.0
        assert r["reward_errors/countdown/failed_samples"] == 0              # computed on every completion
    samples = [json.loads(line) for line in (out / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] is not None for s in samples)
    problems = {json.dumps({"numbers": [int(x) for x in row["input"].split(",")], "target": row["output"]})
                for row, _ in ROWS}
    assert {s["column/answer"] for s in samples} <= problems                # the answer column the reward read
    assert all(s["prompt"].startswith("Using the numbers [") for s in samples)
    # evaluation is scored by the countdown checker, on the test file's rows
    evaluated = [json.loads(line) for line in (out / "eval" / "grpo.jsonl").read_text().splitlines()]
    assert [json.loads(s["answer"])["target"] for s in evaluated] == [row["output"] for row, _ in ROWS[1:]]
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "again")]) == 0
    record = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert record["task"]["checker"] == "countdown"
    assert record["models"]["grpo"]["accuracy"] == report["stages"]["grpo"]["accuracy"]


def test_a_known_solution_scores_one_through_the_recipes_rewards(countdown_files):
    """The rows as the run builds them and the reward entries of the recipe, as the GRPO stage builds its runner."""
    from align.pipeline.recipe import load_splits
    from align.rewards import RewardRunner

    train, test = countdown_files
    cfg = load_config(recipe_path(NAME), [f"data.train_files=[{train}]", f"data.eval_files=[{test}]"])
    rows, _ = load_splits(cfg)
    opts, _ = cfg.stage_options("grpo")
    runner = RewardRunner.from_specs(opts.rewards, **opts.reward_failure)
    try:
        right = [f"The numbers add up.\n\\boxed{{{solution}}}" for _, solution in ROWS]
        wrong = [f"\\boxed{{{solution} + 1}}" for _, solution in ROWS]          # 1 is not one of the numbers
        for completions, expected in ((right, 1.0), (wrong, 0.0)):
            scored = runner(rows["prompt"], completions, None, answer=rows["answer"])
            countdown = scored.per_function[:, scored.names.index("countdown")]
            assert countdown.tolist() == [expected] * len(ROWS)
        assert runner.stats["countdown"].failed_samples == 0
    finally:
        runner.close()
