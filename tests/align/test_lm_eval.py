"""The ``dlm-align`` model of lm-evaluation-harness on the shipped tiny base model, with local tasks.

Two tasks built from held-out problems of the built-in arithmetic task: a generation task (the problem, the
answer read by a regex filter) and a four-way multiple-choice task scored by log-likelihood (the worked solution
up to the last ``=``; the right result and three off by 1-10, each followed by ``The answer is N.``).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import torch
from lm_eval.api.instance import Instance

from align.integrations.lm_eval import MODEL_NAME, register
from align.integrations.lm_eval.settings import HarnessModelArgs
from align.options import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "builtin:quickstart-base"
MC_ITEMS = 60
# Measured: 0.55 on these 60 items (mc_num=32, seed 0); chance is 0.25 (standard deviation 0.056 at n = 60).
MC_MIN_ACCURACY = 0.40
# lm-eval reseeds Python's, numpy's and torch's global generators unless told not to; the model needs none of them.
NO_GLOBAL_SEEDS = {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None}


def _multiple_choice_row(problem: dict, rng: random.Random) -> dict:
    """Context: the problem and its solution up to the last ``=``; choices: the result, then the final answer."""
    answer = int(problem["answer"])
    steps = problem["completion"].rpartition(" The answer is")[0].split(" ")
    context = f"{problem['prompt']} {' '.join(steps[:-1])}"  # drops the last step's result "N."
    wrong: set[int] = set()
    while len(wrong) < 3:
        w = answer + rng.choice((-1, 1)) * rng.randint(1, 10)
        if w >= 0 and w != answer:
            wrong.add(w)
    values = [answer, *sorted(wrong)]
    rng.shuffle(values)
    return {"context": context, "choices": [f" {v}. The answer is {v}." for v in values],
            "label": values.index(answer)}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """``arith_gen`` (generate_until) and ``arith_mc`` (multiple_choice) as lm-eval task YAMLs over local JSONL."""
    from align.data.task import arithmetic_dataset

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    problems = list(arithmetic_dataset(num_train=0, num_test=MC_ITEMS, seed=0)["test"])
    rng = random.Random(0)
    (root / "mc.jsonl").write_text("".join(json.dumps(_multiple_choice_row(p, rng)) + "\n" for p in problems))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n"
                                            for p in problems[:8]))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "arith_mc.yaml").write_text(
        f"task: arith_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (root / "arith_gen.yaml").write_text(
        f"task: arith_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 32\n  do_sample: false\n"
        "filter_list:\n  - name: answer\n    filter:\n      - function: regex\n"
        "        regex_pattern: 'The answer is (\\d+)'\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def lm():
    cls = register()
    return cls(pretrained=SPEC, device="cpu", batch_size=16, mc_num=32, seed=0)


def _evaluate(lm, task_dir: Path, tasks: list[str], **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # only the local tasks: fast
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, **NO_GLOBAL_SEEDS, **kwargs)


def test_model_args_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match=r"unknown model_args key\(s\) \['stepz'\]"):
        HarnessModelArgs.from_dict({"pretrained": SPEC, "stepz": 4})
    with pytest.raises(ConfigError, match=r"'model_args.pretrained' is required"):
        HarnessModelArgs.from_dict({"mc_num": 4})
    with pytest.raises(ConfigError, match=r"'model_args.steps' \(3\) must be a positive multiple"):
        HarnessModelArgs.from_dict({"pretrained": SPEC, "gen_length": 32, "block_length": 16, "steps": 3})
    with pytest.raises(ConfigError, match=r"'model_args.remasking' must be one of"):
        HarnessModelArgs.from_dict({"pretrained": SPEC, "remasking": "best"})
    with pytest.raises(ConfigError, match=r"'model_args.batch_size' 'auto' is not supported"):
        HarnessModelArgs.from_dict({"pretrained": SPEC, "batch_size": "auto"})
    with pytest.raises(ConfigError, match=r"'model_args.mc_num' must be >= 1"):
        HarnessModelArgs.from_dict({"pretrained": SPEC, "mc_num": 0})
    assert HarnessModelArgs.from_dict({"pretrained": SPEC, "temperature": 1}).temperature == 1.0


def test_register_keeps_the_harness_models():
    from lm_eval.api.registry import get_model, model_registry

    cls = register()
    assert register() is cls and get_model(MODEL_NAME) is cls
    assert "hf" in model_registry


def test_generate_until_is_the_rollout_engine_cut_at_until_and_max_gen_toks(lm):
    from align.sampling import completion_lengths, generate

    context = "Tom has 5 pens. He finds 3 more. How many pens does Tom have now?"
    ids = torch.tensor([lm.tok_encode(context)])
    direct = generate(lm.model, ids, gen_length=32, steps=32, block_length=32, temperature=0.0)
    n = int(completion_lengths(direct.completion_ids, lm._stops)[0][0])
    expected = lm.tokenizer.decode(direct.completion_ids[0, :n].tolist(), skip_special_tokens=True)
    assert "=" in expected

    def run(**gen_kwargs) -> str:
        return lm.generate_until([Instance("generate_until", {}, (context, gen_kwargs), 0)], disable_tqdm=True)[0]

    assert run(until=["\n"]) == expected
    assert run(until=["="]) == expected.split("=")[0]
    assert len(lm.tok_encode(run(until=[], max_gen_toks=3), add_special_tokens=False)) <= 3


def test_generation_task_through_simple_evaluate(lm, task_dir):
    out = _evaluate(lm, task_dir, ["arith_gen"], log_samples=True)
    result = out["results"]["arith_gen"]
    assert 0.0 <= result["exact_match,answer"] <= 1.0
    responses = [s["resps"][0][0] for s in out["samples"]["arith_gen"]]
    assert len(responses) == 8 and all(isinstance(r, str) and r for r in responses)
    assert sum("The answer is" in r for r in responses) >= 4  # the base model writes worked solutions


def test_loglikelihood_ranks_the_correct_answer_above_chance(lm, task_dir):
    lm.settings.greedy_check = "off"  # multiple choice reads only the log-likelihoods
    try:
        out = _evaluate(lm, task_dir, ["arith_mc"])
    finally:
        lm.settings.greedy_check = "decode"
    result = out["results"]["arith_mc"]
    assert result["sample_len"] == MC_ITEMS
    print(f"arith_mc accuracy {result['acc,none']:.4f} on {MC_ITEMS} items")
    assert result["acc,none"] >= MC_MIN_ACCURACY, result


def test_loglikelihood_is_deterministic_batch_independent_and_greedy_is_decoding(lm):
    from align.sampling import generate

    context = lm.tok_encode("Ann has 9 coins. She loses 4. How many coins does Ann have now? 9 - 4 =")
    ids = torch.tensor([context])
    greedy = generate(lm.model, ids, gen_length=3, steps=3, block_length=3, temperature=0.0).completion_ids[0]
    other = greedy.clone()
    other[0] = (int(other[0]) + 1) % 10 + 10  # a different ordinary token
    requests = [(("", ""), context, greedy.tolist()), (("", ""), context, other.tolist()),
                (("", ""), context[:5], context[5:])]
    first = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    lm.settings.batch_size = 1
    try:
        again = lm._loglikelihood_tokens(requests[::-1], disable_tqdm=True)[::-1]
    finally:
        lm.settings.batch_size = 16
    assert [g for _, g in first[:2]] == [True, False]
    for (a, _), (b, _) in zip(first, again):
        assert math.isfinite(a) and a < 0 and a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_loglikelihood_rolling_is_the_elbo_of_the_text_after_the_prefix_token(lm):
    text = "Mia has 7 shells. She finds 5 more. How many shells does Mia have now? 7 + 5 = 12. The answer is 12."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    tokens = lm.tok_encode(text, add_special_tokens=False)
    direct = lm._loglikelihood_tokens([((text, ""), [lm.prefix_token_id], tokens)], disable_tqdm=True)[0][0]
    assert math.isfinite(rolling) and rolling == pytest.approx(direct, abs=1e-4)


def test_command_line_runs_both_tasks(task_dir, tmp_path):
    """`dlm-align lm-eval` (what `python -m align.integrations.lm_eval` does, same arguments) runs both tasks."""
    args = [sys.executable, "-m", "align.cli", "lm-eval", "--model", MODEL_NAME, "--model_args",
            f"pretrained={SPEC},mc_num=4,greedy_check=off,gen_length=16,steps=16,block_length=16",
            "--tasks", "arith_gen,arith_mc", "--include_path", str(task_dir), "--limit", "4", "--device", "cpu",
            "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert set(results["results"]) == {"arith_gen", "arith_mc"}
    assert results["config"]["model"] == MODEL_NAME
