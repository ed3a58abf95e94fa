"""Cost of one GRPO step with LoRA and gradient checkpointing on a mid-size model (CPU): time and peak memory.

The model is a random LLaDA with LLaDA's 126,464-token vocabulary and a mid-size body (default d_model 768,
8 layers, 12 heads, MLP 2048: 251M parameters, 194M of them in the embedding and the output head),
fp32, LoRA r16 on every block's linear layers (``peft.target_modules: auto``), gradient checkpointing on. One
GRPO step is timed in three parts, as :class:`align.trainers.grpo.DiffusionGRPOTrainer` runs them:

* rollout: :func:`align.sampling.generate` of ``--num-generations`` completions per prompt (no gradients);
* scoring: the coupled-GRPO mask plan (:func:`align.likelihood.draw_masks`) scored under the policy with
  :func:`align.likelihood.score_plan` (the forward pass of the update, with gradients);
* update: the clipped surrogate with group advantages (random rewards; ``beta: 0``), backward through the
  checkpointed layers and one AdamW step on the adapter.

Peak memory: the process's peak resident size (``VmHWM``) is reset after the model and adapter are built
(``/proc/self/clear_refs``) and read after each part; the growth over the resident size at the reset is compared
with the estimate ``dlm-align validate`` prints for the same recipe (:func:`align.pipeline.plan.stage_memory`,
fp32 dropout masks as on CPU) minus its ``weights`` row, which exists before the reset. The script re-runs itself
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set (see ``bench/memory.py``).

    .venv/bin/python bench/scale.py                    # writes bench/results/scale.json
    .venv/bin/python bench/scale.py --n-layers 8       # a smaller body
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import _proc_kb  # bench/rollout.py: a field of /proc/self/status in kB

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
LLADA_VOCAB = 126464
LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--mlp-hidden-size", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=LLADA_VOCAB)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=2)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=32, help="denoising steps of the rollout")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for name in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "prompts", "num_generations", "prompt_length",
                 "gen_length", "block_length", "steps", "lora_r", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.n_heads:
        p.error(f"--d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    if args.vocab_size <= LLADA_MASK_ID and args.vocab_size != LLADA_VOCAB:
        p.error(f"--vocab-size must exceed LLaDA's mask id {LLADA_MASK_ID}, got {args.vocab_size}")
    return args


# ---------------------------------------------------------------------------------------------- memory
def reset_peak() -> int | None:
    """Reset the peak-RSS counter (Linux); return the resident size in KiB then, or None where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_kb("VmRSS")


# ---------------------------------------------------------------------------------------------- the recipe
def recipe(args: argparse.Namespace) -> dict:
    """The recipe whose GRPO stage this benchmark runs by hand (what ``dlm-align validate`` estimates)."""
    init = {"vocab_size": args.vocab_size, "embedding_size": args.vocab_size, "d_model": args.d_model,
            "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_heads,
            "mlp_hidden_size": args.mlp_hidden_size, "max_sequence_length": 4096,
            "mask_token_id": LLADA_MASK_ID, "eos_token_id": LLADA_EOS_ID, "pad_token_id": LLADA_EOS_ID}
    B = args.prompts * args.num_generations
    sampler = {k: getattr(args, k) for k in ("threshold", "cache") if getattr(args, k, None) is not None}
    return {"seed": args.seed, "output_dir": "runs/bench-scale", "stages": ["grpo"], "report_to": ["none"],
            "model": {"init_config": init, "tokenizer": "builtin:arithmetic",
                      "dtype": getattr(args, "dtype", "float32"), "gradient_checkpointing": True},
            "peft": {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.0},
            "data": {"task": "arithmetic", "max_length": args.prompt_length},
            "grpo": {"num_generations": args.num_generations, "per_device_train_batch_size": B,
                     "gen_length": args.gen_length, "block_length": args.block_length,
                     "denoising_steps": args.steps, "estimator": "coupled", "beta": 0.0, **sampler}}


def memory_estimate(args: argparse.Namespace, model_config, *, dropout_mask_bytes: int = 4):
    """``dlm-align validate``'s estimate for :func:`recipe` (a :class:`~align.memory.MemoryEstimate`).

    ``args`` holds the shapes and settings :func:`recipe` reads; CPU dropout masks are fp32 (4 bytes), CUDA's 1."""
    from align.config import config_from_dict
    from align.memory import architecture_from_config
    from align.pipeline.plan import stage_memory

    cfg = config_from_dict(recipe(args))
    return stage_memory(cfg, "grpo", architecture_from_config(model_config), 1, longest_prompt=args.prompt_length,
                        dropout_mask_bytes=dropout_mask_bytes)


# ---------------------------------------------------------------------------------------------- the step
def build_policy(config, *, lora_r: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> torch.nn.Module:
    """A random LLaDA of ``config`` on ``device`` with gradient checkpointing and a LoRA adapter (``target_modules:
    auto``), as ``dlm-align run`` builds it. On CUDA the weights are created on the device in ``dtype``."""
    from align.build import apply_lora
    from align.config.sections import PeftConfig
    from align.models import LLaDAModelLM

    device = torch.device(device)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            torch.set_default_dtype(dtype)
            with device:
                model = LLaDAModelLM(config)
        finally:
            torch.set_default_dtype(previous)
    model.activation_checkpointing_enable()
    return apply_lora(model, PeftConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0), seed=seed)


def grpo_step(model: torch.nn.Module, prompt_ids: torch.Tensor, *, num_generations: int, gen_length: int,
              block_length: int, steps: int, seed: int = 0, threshold: float | None = None,
              cache: str | None = None, on_part=None) -> dict[str, float]:
    """One GRPO step (rollout, coupled scoring, clipped-surrogate update with AdamW); seconds of each part.

    ``on_part(name)`` is called after each part (to read memory there). Rewards are random 0/1 per completion,
    so the advantages are those of an untrained policy's mixed groups.
    """
    from align.likelihood import draw_masks, score_plan
    from align.sampling import generate
    from align.trainers.grpo_math import aggregate, clipped_surrogate

    dev = prompt_ids.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=dev).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times: dict[str, float] = {}

    sync()
    t0 = time.perf_counter()
    model.eval()
    out = generate(model, prompt_ids, gen_length=gen_length, steps=steps, block_length=block_length,
                   temperature=1.0, threshold=threshold, cache=cache, num_generations=num_generations,
                   generator=gen)
    sync()
    times["rollout"] = time.perf_counter() - t0
    if on_part:
        on_part("rollout")

    t0 = time.perf_counter()
    model.train()
    ids = out.sequences
    P, L = out.prompt_length, gen_length
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, P:] = True
    plan = draw_masks(ids.cpu(), resp.cpu(), estimator="coupled", generator=seed + 1).to(dev)
    logp = score_plan(model, plan).token_logp[:, P:]
    sync()
    times["scoring"] = time.perf_counter() - t0
    if on_part:
        on_part("scoring")

    t0 = time.perf_counter()
    rewards = (torch.rand(ids.shape[0] // num_generations, num_generations, generator=torch.Generator()
                          .manual_seed(seed + 2)) < 0.5).float()
    rewards[:, 0], rewards[:, -1] = 1.0, 0.0                                # every group mixed: a signal
    A = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1, 1).to(dev)
    per_tok, _ = clipped_surrogate(logp, logp.detach(), A, 0.2, 0.2)
    loss = aggregate(per_tok, plan.response_mask[:, P:], "grpo", L)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    times["update"] = time.perf_counter() - t0
    if on_part:
        on_part("update")
    times["total"] = sum(times.values())
    times["nfe"] = float(out.nfe)
    return times


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(os.environ.get(k) != v for k, v in _MMAP_ENV.items()):
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **_MMAP_ENV})
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from align.models import tiny_llada_config

    cfg = tiny_llada_config(**recipe(args)["model"]["init_config"])
    t_build = time.perf_counter()
    model = build_policy(cfg, lora_r=args.lora_r, seed=args.seed)
    t_build = time.perf_counter() - t_build
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = memory_estimate(args, cfg)
    est_step, est_rows = est.total - est.get("weights"), {r.name: r.bytes for r in est.rows if r.in_total}
    prompts = torch.randint(0, LLADA_EOS_ID, (args.prompts, args.prompt_length),
                            generator=torch.Generator().manual_seed(args.seed))
    start_kb = reset_peak()
    peaks: dict[str, float | None] = {}

    def on_part(name: str) -> None:
        hwm = _proc_kb("VmHWM")
        peaks[name] = None if start_kb is None or hwm is None else (hwm - start_kb) * 1024

    times = grpo_step(model, prompts, num_generations=args.num_generations, gen_length=args.gen_length,
                      block_length=args.block_length, steps=args.steps, seed=args.seed, on_part=on_part)
    measured = peaks.get("update")
    ratio = None if measured is None else measured / est_step
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    B = args.prompts * args.num_generations
    print(f"model: {n_params / 1e6:.1f}M parameters ({n_train / 1e6:.2f}M LoRA trainable), d_model {args.d_model}, "
          f"{args.n_layers} layers, vocab {args.vocab_size}; built in {t_build:.1f} s")
    print(f"step: {args.prompts} prompts x {args.num_generations} generations, prompt {args.prompt_length} + gen "
          f"{args.gen_length} tokens, {args.steps} denoising steps, coupled (3 rows per completion), "
          f"{torch.get_num_threads()} thread(s), load average {load if load is None else f'{load:.2f}'}")
    print("\n| part | seconds | share of step | peak RSS growth so far, MiB |")
    print("| --- | ---: | ---: | ---: |")
    for part in ("rollout", "scoring", "update"):
        mib = peaks.get(part)
        print(f"| {part} | {times[part]:.2f} | {times[part] / times['total']:.0%} | "
              f"{'n/a' if mib is None else f'{mib / 2**20:.0f}'} |")
    print(f"| step | {times['total']:.2f} | 100% | {'n/a' if measured is None else f'{measured / 2**20:.0f}'} |")
    print(f"\nestimate (dlm-align validate, minus weights): {est_step / 2**20:.0f} MiB; measured "
          f"{'n/a' if measured is None else f'{measured / 2**20:.0f} MiB ({ratio:.2f} of the estimate)'}")
    payload = {"command": "python bench/scale.py " + " ".join(shlex.quote(a) for a in argv),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "load_average_1min": load,
               "settings": {k: str(v) for k, v in vars(args).items()},
               "params": n_params, "trainable_params": n_train, "rollout_nfe": int(times["nfe"]),
               "seconds": {k: times[k] for k in ("rollout", "scoring", "update", "total")},
               "peak_growth_bytes": peaks, "estimate_step_bytes": est_step, "measured_over_estimate": ratio,
               "estimate_rows_bytes": est_rows, "rows_per_step": B}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
