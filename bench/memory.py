"""Measured peak memory of small CPU training steps against the estimate ``dlm-align validate`` prints.

Each configuration is a recipe (a random LLaDA model of a given shape, local rows, one stage) run in a fresh
subprocess: the model, tokenizer and rows are built as ``dlm-align run`` builds them, the stage's own trainer
(:class:`~align.trainers.sft.DiffusionSFTTrainer` or :class:`~align.trainers.grpo.DiffusionGRPOTrainer`) runs
``--steps`` optimizer steps, and a trainer callback reads the peak resident memory.

Method: at the start of training (weights built; the trainer, its data and, for GRPO, the reference copy
created) the peak-RSS counter of the process is reset (``/proc/self/clear_refs``) and the resident size is
recorded; after every step the peak (``VmHWM``) is read. The measured figure is the growth of the peak over that
starting point. glibc's malloc keeps freed blocks below its mmap threshold in the heap, and raises that
threshold as large blocks are freed, so the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor
of 64 KiB or more gets its own mapping and is returned when freed, and the resident size follows live tensors.

The estimate is :func:`align.pipeline.plan.stage_memory` for the same recipe and the token lengths of its rows,
the figures ``dlm-align validate`` prints (the CPU's dropout masks are fp32, so ``dropout_mask_bytes=4``),
minus what exists before the counter is reset (the weights, and a reference copy).

    .venv/bin/python bench/memory.py                 # writes bench/results/memory.json
    .venv/bin/python bench/memory.py --only sft      # configurations whose label contains "sft"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path("bench/results/memory.json")
SMALL = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "n_layers": 4, "mlp_hidden_size": 704}
WIDER = {"d_model": 384, "n_heads": 6, "n_kv_heads": 2, "n_layers": 4, "mlp_hidden_size": 1024}
_SFT = {"per_device_train_batch_size": 8, "t_min": 0.98, "t_max": 1.0}
# beta > 0: every completion is scored (without a KL term, groups whose rewards are all equal, as they are for
# an untrained model, would be left out of the update)
_GRPO = {"num_generations": 4, "per_device_train_batch_size": 8, "gen_length": 64, "block_length": 32,
         "denoising_steps": 16, "estimator": "coupled", "beta": 0.01, "rewards": [{"name": "task_accuracy"}],
         "reward_failure": {"isolation": "none"}}
_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
# (label, model shape, model dtype, stage, stage settings, LoRA, gradient checkpointing)
CONFIGS: list[tuple[str, dict, str, str, dict, dict | None, bool]] = [
    ("sft fp32", SMALL, "float32", "sft", _SFT, None, False),
    ("sft fp32, checkpointing", SMALL, "float32", "sft", _SFT, None, True),
    ("sft fp32, LoRA r16", SMALL, "float32", "sft", _SFT, _LORA, False),
    ("sft fp32, GQA 6/2 heads", WIDER, "float32", "sft", {**_SFT, "per_device_train_batch_size": 4}, None, False),
    ("sft bf16", SMALL, "bfloat16", "sft", {**_SFT, "per_device_train_batch_size": 4}, None, False),
    ("sft bf16, LoRA r16, checkpointing", SMALL, "bfloat16", "sft", {**_SFT, "per_device_train_batch_size": 4},
     _LORA, True),
    ("grpo fp32, coupled", SMALL, "float32", "grpo", _GRPO, None, False),
    ("grpo fp32, coupled, LoRA r16, checkpointing", SMALL, "float32", "grpo", _GRPO, _LORA, True),
]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rows(path: Path, n: int, words: int, seed: int = 0) -> None:
    """``n`` prompt/completion rows of the same length (digits of the arithmetic task's vocabulary)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            completion = " ".join(str(rng.randint(0, 9)) for _ in range(words))
            f.write(json.dumps({"prompt": f"What is {a} + {b} ?", "completion": completion, "answer": str(a + b)})
                    + "\n")


def _recipe(label: str, shape: dict, dtype: str, stage: str, settings: dict, lora: dict | None, ckpt: bool,
            data: Path, steps: int, out: Path) -> dict:
    init = {**shape, "vocab_size": 4096, "embedding_size": 4096, "max_sequence_length": 512, "mask_token_id": 5,
            "eos_token_id": 0, "pad_token_id": 0}
    raw = {"seed": 0, "output_dir": str(out), "stages": [stage], "report_to": ["none"],
           "model": {"init_config": init, "tokenizer": "builtin:arithmetic", "dtype": dtype,
                     "gradient_checkpointing": ckpt},
           "eval": {"enabled": False},
           stage: {**settings, "max_steps": steps, "learning_rate": 1e-4, "logging_steps": 1000,
                   "dataloader_num_workers": 0}}
    if stage == "grpo":
        raw["data"] = {"task": "arithmetic", "task_args": {"num_train": 64, "num_test": 8}, "max_length": 128}
    else:
        raw["data"] = {"task": None, "train_files": [str(data)], "use_chat_template": False, "max_length": 512}
    if lora is not None:
        raw["peft"] = lora
    return raw


def run_one(raw: dict, threads: int) -> dict:
    """In the subprocess: build, estimate, train ``max_steps`` steps and measure the peak growth."""
    import torch
    from transformers import TrainerCallback

    from align.build import apply_lora, build_model_and_tokenizer
    from align.config import config_from_dict
    from align.memory import architecture_from_config
    from align.pipeline.plan import stage_memory
    from align.pipeline.recipe import check_data
    from align.pipeline.stage import _build_trainer

    torch.set_num_threads(threads)
    cfg = config_from_dict(raw)
    stage = cfg.stages[0]
    model, tokenizer = build_model_and_tokenizer(cfg.model)
    _, _, stats = check_data(cfg, tokenizer)
    s = stats[stage]
    est = stage_memory(cfg, stage, architecture_from_config(model.config), 1, longest=s.longest,
                       longest_prompt=s.longest_prompt, shortest_prompt=s.shortest_prompt, dropout_mask_bytes=4)
    opts = cfg.stage_options(stage)[0]
    est_len = s.longest + (opts.gen_length if stage == "grpo" else 0)
    train, _ = __import__("align.pipeline.recipe", fromlist=["load_splits"]).load_splits(cfg)
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft)
    trainer, runner = _build_trainer(cfg, stage, model, tokenizer, train)
    marks: dict[str, float] = {}
    last = cfg.stage_options(stage)[1]["max_steps"] - 1

    class Peak(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == last:
                Path("/proc/self/clear_refs").write_text("5")
                marks["start_kb"] = _kb("VmRSS")
                marks["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                marks["before_first_step_kb"] = _kb("VmRSS")

        def on_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                marks["states_kb"] = _kb("VmRSS") - marks["before_first_step_kb"]

        def on_step_end(self, args, state, control, **kw):
            if "start_kb" in marks:
                marks["peak_kb"] = _kb("VmHWM")

    trainer.add_callback(Peak())
    try:
        trainer.train()
    finally:
        if runner is not None:
            runner.close()
    states = est.get("optimizer states")
    step = est.total - est.get("weights") - est.get("reference model") - states
    measured_step = (marks["peak_kb"] - marks["start_kb"]) * 1024
    measured_states = marks["states_kb"] * 1024
    return {"estimate_bytes": step, "measured_bytes": measured_step, "ratio": measured_step / step,
            "optimizer_estimate_bytes": states, "optimizer_measured_bytes": measured_states,
            "optimizer_ratio": measured_states / states,
            "seconds": time.perf_counter() - marks["t0"], "seq_len": est_len,
            "rows": {r.name: r.bytes for r in est.rows if r.in_total}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess")
    p.add_argument("--words", type=int, default=240, help="words per SFT completion (one token each)")
    p.add_argument("--only", default=None, help="run the configurations whose label contains this text")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(json.loads(Path(args.one).read_text()), args.threads)))
        return
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "TRITON_INTERPRET": "1", "WANDB_MODE": "offline"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        _rows(data, 64, args.words)
        for label, shape, dtype, stage, settings, lora, ckpt in CONFIGS:
            if args.only and args.only not in label:
                continue
            spec = Path(tmp) / "recipe.json"
            spec.write_text(json.dumps(_recipe(label, shape, dtype, stage, settings, lora, ckpt, data, args.steps,
                                               Path(tmp) / "run")))
            proc = subprocess.run([sys.executable, __file__, "--one", str(spec), "--threads", str(args.threads)],
                                  env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{label}: failed\n{proc.stderr[-4000:]}")
            res = {"config": label, **json.loads(line[len("RESULT "):])}
            results.append(res)
            print(f"{label:<46} step: estimate {res['estimate_bytes'] / 2**20:7.1f} MiB, measured "
                  f"{res['measured_bytes'] / 2**20:7.1f} MiB ({res['ratio']:.2f}); optimizer states: estimate "
                  f"{res['optimizer_estimate_bytes'] / 2**20:5.1f} MiB, measured "
                  f"{res['optimizer_measured_bytes'] / 2**20:5.1f} MiB ({res['optimizer_ratio']:.2f})", flush=True)
    print("\n| configuration | tokens per row | step peak, estimate MiB | measured MiB | measured / estimate "
          "| optimizer states, estimate MiB | measured MiB | measured / estimate |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['config']} | {r['seq_len']} | {r['estimate_bytes'] / 2**20:.1f} | "
              f"{r['measured_bytes'] / 2**20:.1f} | {r['ratio']:.2f} | {r['optimizer_estimate_bytes'] / 2**20:.1f} | "
              f"{r['optimizer_measured_bytes'] / 2**20:.1f} | {r['optimizer_ratio']:.2f} |")
    import torch

    payload = {"command": "python bench/memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
               "cpu": platform.machine(), "torch": torch.__version__, "threads": args.threads, "steps": args.steps,
               "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
