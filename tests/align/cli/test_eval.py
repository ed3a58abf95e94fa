"""``dlm-align eval``: checkers, intervals and shards; the acceptance check that evaluating a run's checkpoints with
its recipe gives the run report's numbers and completions exactly; adapters; two processes equal one."""

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.cli import main
from align.evaluate import build_checker, few_shot_prompt, shard_bounds, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ("prompt", "completion", "answer", "predicted", "correct", "length", "loop_fraction")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 2), (7, 2, 3), (3, 4, 2), (16, 4, 4)])
def test_shards_are_contiguous_whole_batches(n, batch, world):
    bounds = [shard_bounds(n, batch, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start                                 # contiguous, no gap, no overlap
    for start, end in bounds:
        if start < end:                                     # a rank may get nothing when batches run out
            assert start % batch == 0 and (end % batch == 0 or end == n)   # cut at batch boundaries only


def test_checkers():
    gsm8k = build_checker("math_accuracy")
    assert gsm8k("so she pays 18 dollars. The answer is 18.", "She pays 9 * 2 = 18 dollars.\n#### 18") == ("18", True)
    assert gsm8k("The answer is 17.", "#### 18")[1] is False
    assert build_checker("math_accuracy")("\\boxed{\\frac{1}{2}}", "The value is $\\boxed{0.5}$.")[1] is True
    countdown = build_checker("countdown")
    ref = json.dumps({"numbers": [3, 5, 7], "target": 22})
    assert countdown("so \\boxed{3 * 5 + 7}", ref) == ("3 * 5 + 7", True)
    assert countdown("\\boxed{3 * 7 + 1}", ref)[1] is False          # 1 is not one of the numbers
    assert countdown("\\boxed{5 * 5 - 3}", ref)[1] is False          # 5 twice, 7 unused
    assert countdown("\\boxed{__import__('os')}", ref)[1] is False   # not arithmetic: refused, not run
    reward = build_checker("task_accuracy")
    assert reward("The answer is 42.", "42")[1] is True
    with pytest.raises(ValueError, match="unknown checker 'nope'"):
        build_checker("nope")


def test_few_shot_prompt_turns_and_text():
    shots = [("What is 1 + 1?", "1 + 1 = 2. The answer is 2."), ("What is 2 + 3?", "The answer is 5.")]
    chat = few_shot_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}], shots)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert chat[2]["content"] == shots[0][1] and chat[-1]["content"] == "Q?"
    text = few_shot_prompt("Q?", shots, use_chat_template=False)
    assert text.startswith("Question: What is 1 + 1?\nAnswer: 1 + 1 = 2.") and text.endswith("Question: Q?\nAnswer:")


def test_bad_flags_name_the_problem(tmp_path, capsys):
    assert main(["eval", "--model", "builtin:quickstart-base", "--out", str(tmp_path)]) == 2
    assert "name one task" in capsys.readouterr().err
    assert main(["eval", "--task", "builtin:arithmetic", "--model", "builtin:quickstart-base",
                 "--gen-length", "30", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'gen_length'" in err and "--gen-length" in err and "eval.gen_length" in err
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    assert main(["eval", "--data", str(data), "--format", "gsm8k", "--shots", "1", "--model",
                 "builtin:quickstart-base", "--out", str(tmp_path)]) == 2
    assert "--fewshot-file" in capsys.readouterr().err
    assert main(["eval", "--data", str(data), "--model", "builtin:quickstart-base", "--out", str(tmp_path)]) == 2
    assert "'prompt'" in capsys.readouterr().err      # plain format: no 'prompt' column in a GSM8K row


def test_gsm8k_file_with_shots_records_the_data(tmp_path):
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many apples does Tom have?",
             "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(2, 3), (4, 4), (5, 1)]]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shots = tmp_path / "train.jsonl"
    shots.write_text(json.dumps({"question": "Ann has 1 pen and gets 1 more. How many pens?",
                                 "answer": "1 + 1 = 2. The answer is 2."}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(data), "--format", "gsm8k", "--shots", "1", "--fewshot-file", str(shots),
                 "--model", "builtin:quickstart-base", "--gen-length", "16", "--denoising-steps", "16",
                 "--block-length", "16", "--batch-size", "2", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    task = record["task"]
    assert task["rows"] == 3 and task["num_problems"] == 3 and task["prompt_column"] == "question"
    import hashlib

    assert task["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["shots"]["n"] == 1 and record["shots"]["sha256"] == hashlib.sha256(shots.read_bytes()).hexdigest()
    assert record["sampler"]["gen_length"] == 16 and record["sampler"]["batch_size"] == 2
    samples = _jsonl(out / "quickstart-base.jsonl")
    assert [s["answer"] for s in samples] == [r["answer"] for r in rows]
    assert samples[0]["prompt"] == rows[0]["question"]               # the question, after the shot's turns
    entry = record["models"]["quickstart-base"]
    assert entry["num_problems"] == 3 and 0 < entry["nfe"] <= 2 * 16  # two batches of at most 16 steps
    assert entry["accuracy"] == sum(s["correct"] for s in samples) / 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A few SFT steps of the shipped base model on the built-in task, evaluated on 6 problems (batches of 4)."""
    root = tmp_path_factory.mktemp("run")
    raw = {"seed": 0, "output_dir": str(root / "run"), "stages": ["sft"],
           "model": {"path": "builtin:quickstart-base", "dtype": "float32"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 64, "num_test": 6, "seed": 0},
                    "max_length": 128},
           "sft": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
                   "save_steps": 3},
           "eval": {"num_problems": 6, "batch_size": 4, "gen_length": 32, "denoising_steps": 32,
                    "block_length": 16}}
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


def test_eval_of_a_run_gives_its_report_exactly(tiny_run, tmp_path):
    out = tmp_path / "again"
    assert main(["eval", "--run", str(tiny_run), "--out", str(out)]) == 0
    report = json.loads((tiny_run / "report.json").read_text())
    record = json.loads((out / "eval.json").read_text())
    assert list(record["models"]) == ["base", "sft"]
    for stage in ("base", "sft"):
        mine, theirs = record["models"][stage], report["stages"][stage]
        for key in ("accuracy", "mean_completion_length", "loop_rate", "num_problems", "nfe"):
            assert mine[key] == theirs[key], (stage, key)
        run_rows = _jsonl(tiny_run / "eval" / f"{stage}.jsonl")
        eval_rows = _jsonl(out / f"{stage}.jsonl")
        assert [{k: r[k] for k in KEYS} for r in eval_rows] == [{k: r[k] for k in KEYS} for r in run_rows]
    recipe = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert {k: v for k, v in record["sampler"].items() if k != "enabled"} == \
        {k: v for k, v in recipe["eval"].items() if k != "enabled"}
    assert record["seed"] == 0 and record["task"]["rows"] == 6 and record["environment"]["dtype"] == "float32"
    assert record["environment"]["versions"]["torch"] and record["arguments"]["run"] == str(tiny_run)
    c = record["comparisons"]["sft_vs_base"]
    assert c["n"] == 6 and c["delta"] == record["models"]["sft"]["accuracy"] - record["models"]["base"]["accuracy"]


def test_adapter_directory_is_applied_on_its_base(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from align.build import build_model_and_tokenizer
    from align.config import EvalConfig, ModelConfig
    from align.evaluate import evaluate
    from align.pipeline.recipe import _eval_rows, _task_splits

    model, tok = build_model_and_tokenizer(ModelConfig(path="builtin:quickstart-base"))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = "builtin:quickstart-base"
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    out = tmp_path / "out"
    assert main(["eval", "--task", "builtin:arithmetic", "--model", "builtin:quickstart-base", "--model",
                 f"lora={adapter}", "--num-problems", "4", "--batch-size", "4", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["models"]["lora"]["adapter"] == str(adapter)
    assert record["models"]["lora"]["model"] == "builtin:quickstart-base"
    # the same completions as the adapter applied in this process
    from align.config import load_config
    from align.recipes import recipe_path

    cfg = load_config(recipe_path("quickstart"))
    prompts, answers = _eval_rows(cfg, _task_splits(cfg)[1])
    settings = EvalConfig(**{**{k: v for k, v in vars(cfg.eval).items()}, "num_problems": 4, "batch_size": 4})
    direct = evaluate(peft_model.eval(), tok, prompts[:4], answers[:4], settings, seed=0)
    assert [s["completion"] for s in _jsonl(out / "lora.jsonl")] == [s["completion"] for s in direct.samples]
    assert "lora_vs_quickstart-base" in record["comparisons"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    args = ["eval", "--task", "builtin:arithmetic", "--model", "builtin:quickstart-base", "--num-problems", "6",
            "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "align.cli",
                           *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    for key in ("accuracy", "mean_completion_length", "loop_rate", "nfe", "num_problems"):
        assert one["models"]["quickstart-base"][key] == two["models"]["quickstart-base"][key], key
    rows_one = _jsonl(tmp_path / "one" / "quickstart-base.jsonl")
    rows_two = _jsonl(tmp_path / "two" / "quickstart-base.jsonl")
    assert rows_one == rows_two and len(rows_two) == 6
