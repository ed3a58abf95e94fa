"""bench/gpu_check.py, bench/gpu_check.sh, bench/fsdp2_check.py and bench/scale.py on CPU: the no-CUDA path, the dry
run, and every part at tiny shapes (each run in a subprocess, as a user runs the scripts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# no GPU, one thread, the kernel part on its torch twin (the Triton interpreter is too slow for a smoke test)
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": "",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_says_so_and_exits_0():
    proc = _run(str(BENCH / "gpu_check.py"), "all")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to check"


def test_gpu_check_sh_without_cuda_exits_0_and_writes_nothing(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**ENV, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device: nothing to check" in proc.stdout
    assert "==" not in proc.stdout  # no part was started


def test_gpu_check_rejects_an_unknown_part():
    proc = _run(str(BENCH / "gpu_check.py"), "kernels")
    assert proc.returncode == 2
    assert "invalid choice: 'kernels'" in proc.stderr


def test_gpu_check_dry_run_has_llada_8b_shapes_and_an_estimate(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(str(BENCH / "gpu_check.py"), "--dry-run", "all", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())["dry_run"]
    assert plan["parts"] == ["kernel", "rollout", "grpo"]
    assert 8.0e9 < plan["params"] < 8.1e9                       # LLaDA-8B: 8.02B parameters
    assert plan["grpo_estimate_bytes"] > 2 * plan["params"]     # bf16 weights plus the step
    assert "d_model 4096, 32 layers" in proc.stdout and "vocab 126464" in proc.stdout


def test_gpu_check_every_part_at_tiny_shapes_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(str(BENCH / "gpu_check.py"), "--tiny", "all", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert "device" not in res                                   # no CUDA device was seen
    k = res["kernel"]
    assert k["backend"] == "torch" and k["same_tokens_t0"] is True
    for test in k["chi_square_t1"].values():
        assert test["dof"] >= 10 and test["p_value"] > 1e-4
    assert k["kernel_gb_s"] > 0 and k["copy_gb_s_moved"] == pytest.approx(2 * k["copy_gb_s_read"])
    modes = res["rollout"]["modes"]
    assert [m["mode"] for m in modes] == ["exact", "threshold 0.9 + prefix cache"]
    assert all(m["tokens_per_s"] > 0 and 1 <= m["nfe"] <= 16 for m in modes)
    g = res["grpo"]
    assert all(g["seconds"][p] > 0 for p in ("rollout", "scoring", "update"))
    assert g["estimate_total_bytes"] > 0 and g["measured_over_estimate"] is None   # no CUDA allocator on CPU
    for part in ("## kernel", "## rollout", "## GRPO step"):
        assert part in proc.stdout


def test_chi_square_accepts_the_distribution_and_rejects_another():
    chi_square = _gpu_check_module().chi_square
    probs = torch.softmax(torch.linspace(-2, 2, 20, dtype=torch.float64), 0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs, 20000, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=20)
    _, dof, p_same = chi_square(counts, probs)
    _, _, p_other = chi_square(counts, probs.flip(0))
    assert dof == 19
    assert p_same > 1e-3 and p_other < 1e-12


def test_scale_one_step_at_tiny_shapes(tmp_path):
    out = tmp_path / "scale.json"
    proc = _run(str(BENCH / "scale.py"), "--d-model", "64", "--n-heads", "4", "--n-layers", "2",
                "--mlp-hidden-size", "128", "--gen-length", "8", "--block-length", "8", "--steps", "8",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    sec = res["seconds"]
    assert all(sec[p] > 0 for p in ("rollout", "scoring", "update"))
    assert sec["total"] == pytest.approx(sec["rollout"] + sec["scoring"] + sec["update"])
    assert res["rollout_nfe"] == 8 and res["rows_per_step"] == 4
    assert res["params"] > 2 * 126464 * 64 and 0 < res["trainable_params"] < res["params"] / 100
    assert res["estimate_step_bytes"] > 0
    if sys.platform == "linux":   # peak RSS from /proc: the measured step within a factor 3 of the estimate
        assert 1 / 3 < res["measured_over_estimate"] < 3
    assert "| rollout |" in proc.stdout and "| update |" in proc.stdout


def test_scale_step_trains_the_adapter_through_checkpointed_layers():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    from align.models import tiny_llada_config

    model = scale.build_policy(tiny_llada_config(vocab_size=128), lora_r=4)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)          # only the adapter trains
    times = scale.grpo_step(model, torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(0)),
                            num_generations=2, gen_length=8, block_length=8, steps=8)
    assert times["nfe"] == 8
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in changed)                          # gradients reached every adapter's B
    assert len([n for n in changed if "lora_B" in n]) == len([n for n in trainable if "lora_B" in n])


def test_scale_rejects_bad_shapes():
    proc = _run(str(BENCH / "scale.py"), "--d-model", "100", "--n-heads", "3")
    assert proc.returncode == 2
    assert "--d-model 100 is not a multiple of --n-heads 3" in proc.stderr


def test_fsdp2_check_without_cuda_says_so_and_exits_0():
    proc = _run(str(BENCH / "fsdp2_check.py"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to check"


@pytest.mark.slow
def test_fsdp2_check_on_cpu_reports_that_fsdp_did_not_run(tmp_path):
    """On a CPU accelerate runs DDP instead of FSDP: the check runs the recipe to the end, finds `ddp` in the report
    and fails, saying so (on a GPU machine the same code path passes with `fsdp2`)."""
    out = tmp_path / "r.json"
    proc = _run(str(BENCH / "fsdp2_check.py"), "--allow-cpu", "--json", str(out), "--keep", str(tmp_path / "k"),
                timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FSDP2 did not run as asked" in proc.stdout
    assert "backend ddp" in proc.stdout
    result = json.loads(out.read_text())["fsdp2"]
    assert result["exit"] == 0 and result["ok"] is False
    assert result["stages"]["grpo"]["processes"] == 2 and result["completions_logged"] > 0


def test_objectives_takes_overrides_before_or_after_the_seeds():
    spec = importlib.util.spec_from_file_location("bench_objectives", BENCH / "objectives.py")
    objectives = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(objectives)
    args = objectives.parse_args(["grpo.max_steps=9", "--seeds", "0", "1"])
    assert args.seeds == [0, 1] and args.overrides == ["grpo.max_steps=9"]
    args = objectives.parse_args(["--seeds", "2", "--", "grpo.max_steps=9"])
    assert args.seeds == [2] and args.overrides == ["grpo.max_steps=9"]
    wrong = _run(str(BENCH / "objectives.py"), "--seeds", "0", "grpo.max_steps=9")
    assert wrong.returncode == 2 and "'grpo.max_steps=9' is not a seed" in wrong.stderr


@pytest.mark.slow
def test_objectives_protocol_on_a_tiny_recipe(tmp_path, tiny_init_config):
    """bench/objectives.py end to end at tiny scale: one SFT stage, then two variants × two seeds from it, each run
    evaluated before and after; the table and results agree with the runs' own reports."""
    import yaml

    raw = {"seed": 0, "output_dir": str(tmp_path / "unused"), "stages": ["sft", "grpo"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 64, "num_test": 8, "seed": 0}, "max_length": 128},
           "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
           "grpo": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                    "denoising_steps": 8, "block_length": 8, "logging_steps": 1},
           "eval": {"num_problems": 8, "batch_size": 4, "gen_length": 8, "denoising_steps": 8, "block_length": 8}}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("# dlm-align run tiny\n" + yaml.safe_dump(raw))
    proc = _run(str(BENCH / "objectives.py"), "--recipe", str(recipe), "--variants", "grpo/one_step,wd1/one_step",
                "--seeds", "0", "1", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "out" / "tiny"
    results = json.loads((tmp_path / "res" / "objectives-tiny.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results["rows"]] == [
        ("grpo/one_step", 0), ("grpo/one_step", 1), ("wd1/one_step", 0), ("wd1/one_step", 1)]
    assert results["sft"] == str(out / "sft" / "sft" / "final")
    for r in results["rows"]:
        run = out / r["variant"].replace("/", "-") / f"seed{r['seed']}"
        report = json.loads((run / "report.json").read_text())
        assert report["recipe"]["seed"] == r["seed"]
        assert report["recipe"]["grpo"]["loss_type"] == r["variant"].split("/")[0]
        assert report["recipe"]["model"]["path"] == results["sft"]
        assert r["gain_points"] == pytest.approx(100 * (r["grpo_accuracy"] - r["sft_accuracy"]))
        assert 0 <= r["p_value"] <= 1 and r["seconds_per_step"] > 0
    lines = (tmp_path / "res" / "objectives-tiny.md").read_text().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| grpo/one_step | 2 |") and lines[3].startswith("| wd1/one_step | 2 |")
    # --merge: a later invocation (here: read back from the runs above) keeps the rows it does not make
    results_file = tmp_path / "res" / "objectives-tiny.json"
    again = _run(str(BENCH / "objectives.py"), "--recipe", str(recipe), "--variants", "wd1/one_step", "--seeds", "1",
                 "--sft", results["sft"], "--merge", "--out", str(tmp_path / "out"), "--results",
                 str(tmp_path / "res"), timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    merged = json.loads(results_file.read_text())["rows"]
    assert [(r["variant"], r["seed"]) for r in merged] == [
        ("grpo/one_step", 0), ("grpo/one_step", 1), ("wd1/one_step", 0), ("wd1/one_step", 1)]
    assert merged[:3] == results["rows"][:3] and merged[3]["wall_seconds"] is None     # read back: not timed here
    # ... and refuses rows made from another SFT checkpoint or other overrides
    results_file.write_text(json.dumps({**json.loads(results_file.read_text()), "overrides": ["grpo.max_steps=9"]}))
    refused = _run(str(BENCH / "objectives.py"), "--recipe", str(recipe), "--variants", "wd1/one_step", "--seeds",
                   "1", "--sft", results["sft"], "--merge", "--out", str(tmp_path / "out"), "--results",
                   str(tmp_path / "res"), timeout=300)
    assert refused.returncode != 0 and "grpo.max_steps=9" in refused.stderr
    # a finished run is read back only when its recorded recipe is the one asked for
    other = _run(str(BENCH / "objectives.py"), "--recipe", str(recipe), "--variants", "wd1/one_step", "--seeds", "1",
                 "--sft", results["sft"], "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res2"),
                 "grpo.learning_rate=0.5", timeout=300)
    assert other.returncode != 0 and "holds a finished run of other settings" in other.stderr
    assert "grpo.learning_rate is" in other.stderr and "not 0.5" in other.stderr
    assert not (tmp_path / "res2").exists()
