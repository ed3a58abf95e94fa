"""FSDP2 through the Trainer, for a machine with GPUs (part of ``bench/gpu_check.sh``).

accelerate runs FSDP on accelerators only, so the CPU test suite checks FSDP2 below the Trainer
(``tests/workers/fsdp2_worker.py``). This script runs the whole path: a tiny recipe, SFT (4 steps) then GRPO
(3 steps, ``beta`` 0.04), launched by ``dlm-align run --nproc N --launcher accelerate --config_file fsdp2.yaml``
on N = min(2, GPUs) processes, and checks that ``report.json`` names ``fsdp2`` for both stages with a weights
digest the ranks agreed on, and that GRPO logged completions. It prints one line per stage and merges the
result into ``--json``.

    python bench/fsdp2_check.py [--json bench/results/gpu_check.json] [--keep DIR]

Without CUDA it says so and exits 0 (``--allow-cpu`` runs it anyway: accelerate then runs DDP, and the check
fails, saying so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
        "max_sequence_length": 128, "mask_token_id": 5, "eos_token_id": 0, "pad_token_id": 0}


def write_recipe(folder: Path) -> Path:
    """The tiny SFT + GRPO recipe, its run under ``folder/run``."""
    raw = {"seed": 0, "output_dir": str(folder / "run"), "stages": ["sft", "grpo"],
           "model": {"init_config": TINY, "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 256, "num_test": 16, "seed": 0},
                    "max_length": 128},
           "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
           "grpo": {"max_steps": 3, "per_device_train_batch_size": 8, "num_generations": 4, "gen_length": 16,
                    "denoising_steps": 8, "block_length": 16, "learning_rate": 1e-3, "logging_steps": 1,
                    "beta": 0.04, "rewards": [{"name": "task_accuracy"}]},
           "eval": {"num_problems": 16, "batch_size": 4, "gen_length": 16, "denoising_steps": 8, "block_length": 16}}
    path = folder / "recipe.yaml"
    path.write_text("# dlm-align run fsdp2 check\n" + yaml.safe_dump(raw))
    return path


def check(folder: Path, nproc: int) -> dict:
    """Run the recipe under the shipped FSDP2 config; the facts of its report."""
    recipe = write_recipe(folder)
    cmd = [sys.executable, "-m", "align.cli", "run", str(recipe), "--nproc", str(nproc), "--launcher",
           "accelerate", "--config_file", "fsdp2.yaml"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    result: dict = {"command": " ".join(cmd), "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        result["error"] = (proc.stdout + proc.stderr)[-2000:]
        return result
    report = json.loads((folder / "run" / "report.json").read_text())
    result["stages"] = {s: {k: report["stages"][s].get(k) for k in ("processes", "backend", "weights_digest",
                                                                    "accuracy")} for s in ("sft", "grpo")}
    completions = folder / "run" / "grpo" / "completions.jsonl"
    result["completions_logged"] = len(completions.read_text().splitlines()) if completions.exists() else 0
    result["ok"] = all(v["backend"] == "fsdp2" and v["processes"] == nproc for v in result["stages"].values()) \
        and result["completions_logged"] > 0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="merge the result into this file under 'fsdp2'")
    p.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temporary one)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA too (accelerate then runs DDP)")
    args = p.parse_args(argv)
    gpus = torch.cuda.device_count()
    if not gpus and not args.allow_cpu:
        print("no CUDA device: nothing to check")
        return 0
    nproc = min(2, gpus) if gpus else 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = check(args.keep, nproc)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = check(Path(tmp), nproc)
    for stage, facts in result.get("stages", {}).items():
        print(f"{stage:5s} processes {facts['processes']}  backend {facts['backend']}  "
              f"digest {facts['weights_digest']}")
    if result["exit"] != 0:
        print(f"the run failed (exit {result['exit']}):\n{result['error']}")
    elif not result["ok"]:
        print("FSDP2 did not run as asked: see the back-ends above")
    else:
        print(f"fsdp2: {nproc} process(es), both stages under FSDP2, {result['completions_logged']} completions "
              f"logged, {result['seconds']} s")
    if args.json is not None:
        data = json.loads(args.json.read_text()) if args.json.exists() else {}
        data["fsdp2"] = result
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
