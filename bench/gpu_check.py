"""GPU check: the sampling kernel, rollout throughput and one LoRA GRPO step at LLaDA-8B shapes (random weights).

Subcommands (``bench/gpu_check.sh`` runs them in order, each under its own time limit):

* ``kernel``: the Triton sampling step (:func:`align.kernels.sampling_step.sample_step_triton`) against its torch
  twin on random logits of LLaDA's vocabulary (126,464): the same tokens at T = 0; at T = 1 a chi-square test of
  many draws from one row against ``softmax(logits)`` for each backend; throughput of the kernel and of a copy of
  the same logits (GB/s of logits read; the copy also writes them back).
* ``rollout``: tokens/s of :func:`align.sampling.generate` at LLaDA-8B shapes (bf16 weights created on the device,
  random): exact decoding (one token per step, no cache) and threshold decoding with the prefix KV cache.
* ``grpo``: one GRPO step with a LoRA adapter (r 16, ``target_modules: auto``) and gradient checkpointing at
  LLaDA-8B shapes (``bench/scale.py``'s step: rollout, coupled scoring, update): time of each part and peak memory
  (``torch.cuda.max_memory_allocated``) against ``dlm-align validate``'s estimate for the same recipe.

Every subcommand prints its table as soon as it finishes and merges its result into ``--json``. Without a CUDA
device it prints ``no CUDA device: nothing to check`` and exits 0. ``--dry-run`` prints the shapes and the
memory estimate without running anything (no GPU needed); ``--tiny`` runs every part at tiny shapes, on CPU when
there is no GPU (the kernel part then checks the torch twin, or the Triton kernel under ``TRITON_INTERPRET=1``).

    python bench/gpu_check.py all                  # every part (on a CUDA machine)
    python bench/gpu_check.py --dry-run all        # shapes and estimate only
    python bench/gpu_check.py --tiny all           # smoke test at tiny shapes (CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # bench/scale.py: the recipe, the policy and the GRPO step

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
PARTS = ("kernel", "rollout", "grpo")
NO_CUDA = "no CUDA device: nothing to check"


def shapes(tiny: bool) -> dict:
    """Model shapes and sizes of every part: LLaDA-8B's (``align.models.llada_8b_config``) or tiny ones."""
    from align.models import llada_8b_config

    if tiny:
        model = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 128,
                 "vocab_size": 512, "embedding_size": 512, "mask_token_id": 511, "eos_token_id": 510,
                 "pad_token_id": 510, "eot_token_id": 509}
        return {"model": model, "kernel_rows": 64, "kernel_draws": 20000, "kernel_support": 16, "batch": 2,
                "prompt_length": 8, "gen_length": 16, "block_length": 8, "grpo_prompts": 1, "grpo_generations": 2,
                "lora_r": 4, "repeats": 1}
    c = llada_8b_config()
    model = {k: getattr(c, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                                        "vocab_size", "embedding_size", "mask_token_id", "eos_token_id",
                                        "pad_token_id", "rope_theta", "max_sequence_length")}
    return {"model": model, "kernel_rows": 256, "kernel_draws": 200000, "kernel_support": 64, "batch": 8,
            "prompt_length": 64, "gen_length": 256, "block_length": 32, "grpo_prompts": 2, "grpo_generations": 4,
            "lora_r": 16, "repeats": 20}


def _config(s: dict):
    from align.models import llada_8b_config

    return llada_8b_config(**s["model"])


def _merge(path: Path | None, part: str, result: dict) -> None:
    if path is None:
        return
    data = json.loads(path.read_text()) if path.exists() else {}
    data[part] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------- kernel
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells below 5 expected draws pooled); returns
    (statistic, degrees of freedom, p-value)."""
    from scipy.stats import chi2

    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return stat, dof, float(chi2.sf(stat, dof))


def run_kernel(s: dict, device: torch.device) -> dict:
    """Part 1: tokens at T = 0, a chi-square test at T = 1, throughput against a copy."""
    from align.kernels.sampling_step import sample_step_torch, sample_step_triton, triton_available

    V, N = s["model"]["vocab_size"], s["kernel_rows"]
    use_triton = triton_available(device)
    kernel = sample_step_triton if use_triton else sample_step_torch
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, generator=gen, device=device) * 3
    a = kernel(logits, temperature=0.0, seed=1)
    b = sample_step_torch(logits, temperature=0.0, generator=torch.Generator(device=device).manual_seed(1))
    same_tokens = bool(torch.equal(a.tokens, b.tokens))
    conf_diff = float((a.confidence - b.confidence).abs().max())
    # one row whose mass sits on `support` tokens (the rest of the vocabulary far below), drawn `draws` times
    k, draws = s["kernel_support"], s["kernel_draws"]
    row = torch.full((V,), -30.0, device=device)
    row[:k] = torch.randn(k, generator=gen, device=device)
    probs = torch.softmax(row.double(), -1).cpu()
    tests = {}
    chunk = min(draws, 2048)  # rows per call: a [chunk, V] copy of the row at a time
    for name, fn in (("kernel", kernel), ("torch twin", sample_step_torch)):
        draw_gen = torch.Generator(device=device).manual_seed(2)
        counts = torch.zeros(V, dtype=torch.long)
        for start in range(0, draws, chunk):
            n = min(chunk, draws - start)
            tokens = fn(row.expand(n, V).contiguous(), temperature=1.0, generator=draw_gen).tokens
            counts += torch.bincount(tokens.cpu(), minlength=V)
        stat, dof, p = chi_square(counts, probs)
        tests[name] = {"statistic": stat, "dof": dof, "p_value": p}
    nbytes = logits.numel() * logits.element_size()
    out = torch.empty_like(logits)
    t_kernel = _best_seconds(lambda: kernel(logits, temperature=1.0, seed=3), device, s["repeats"])
    t_twin = _best_seconds(lambda: sample_step_torch(logits, temperature=1.0, generator=gen), device,
                           max(1, s["repeats"] // 4))
    t_copy = _best_seconds(lambda: out.copy_(logits), device, s["repeats"])
    result = {"backend": "triton" if use_triton else "torch", "rows": N, "vocab": V, "same_tokens_t0": same_tokens,
              "max_confidence_diff_t0": conf_diff, "chi_square_t1": tests, "draws": draws, "support": k,
              "logits_bytes": nbytes, "kernel_seconds": t_kernel, "twin_seconds": t_twin, "copy_seconds": t_copy,
              "kernel_gb_s": nbytes / t_kernel / 1e9, "twin_gb_s": nbytes / t_twin / 1e9,
              "copy_gb_s_read": nbytes / t_copy / 1e9, "copy_gb_s_moved": 2 * nbytes / t_copy / 1e9}
    print(f"\n## kernel ({result['backend']} vs torch twin, {N} x {V} fp32 logits on {device})")
    print(f"T=0: same tokens {same_tokens}, max |confidence diff| {conf_diff:.2e}")
    for name, t in tests.items():
        print(f"T=1 chi-square ({name}, {draws} draws, {k} likely tokens): {t['statistic']:.1f} on {t['dof']} dof, "
              f"p = {t['p_value']:.3f}")
    print("| what | ms | GB/s of logits read |")
    print("| --- | ---: | ---: |")
    print(f"| sampling step ({result['backend']}) | {t_kernel * 1e3:.3f} | {result['kernel_gb_s']:.1f} |")
    print(f"| sampling step (torch twin) | {t_twin * 1e3:.3f} | {result['twin_gb_s']:.1f} |")
    print(f"| copy of the logits (reads + writes: {result['copy_gb_s_moved']:.0f} GB/s) | {t_copy * 1e3:.3f} | "
          f"{result['copy_gb_s_read']:.1f} |", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- rollout
def _model(s: dict, device: torch.device, dtype: torch.dtype):
    from align.models import LLaDAModelLM

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with device:
            model = LLaDAModelLM(_config(s))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_rollout(s: dict, device: torch.device) -> dict:
    """Part 2: generated tokens/s, exact decoding and threshold + prefix cache."""
    from align.memory import human_count
    from align.sampling import generate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = _model(s, device, dtype)
    built = time.perf_counter() - t0
    B, P, L, blk = s["batch"], s["prompt_length"], s["gen_length"], s["block_length"]
    prompts = torch.randint(0, s["model"]["eos_token_id"], (B, P), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
    modes = {"exact": {}, "threshold 0.9 + prefix cache": {"threshold": 0.9, "cache": "prefix"}}
    rows = []
    print(f"\n## rollout ({human_count(sum(p.numel() for p in model.parameters()))} params, {dtype}, built in "
          f"{built:.1f} s; batch {B}, prompt {P}, gen {L}, block {blk}, {L} steps)")
    print("| mode | seconds | network evaluations | generated tokens/s |")
    print("| --- | ---: | ---: | ---: |", flush=True)
    for name, extra in modes.items():
        _sync(device)
        t0 = time.perf_counter()
        out = generate(model, prompts, gen_length=L, steps=L, block_length=blk, temperature=0.0, **extra)
        _sync(device)
        sec = time.perf_counter() - t0
        rows.append({"mode": name, "seconds": sec, "nfe": out.nfe, "tokens_per_s": B * L / sec})
        print(f"| {name} | {sec:.2f} | {out.nfe} | {B * L / sec:.0f} |", flush=True)
    return {"dtype": str(dtype), "batch": B, "prompt_length": P, "gen_length": L, "block_length": blk,
            "build_seconds": built, "modes": rows}


# ---------------------------------------------------------------------------------------------- GRPO step
def grpo_namespace(s: dict, dtype: str) -> argparse.Namespace:
    """The settings :func:`scale.recipe` reads, for this check's GRPO step."""
    m = s["model"]
    return argparse.Namespace(d_model=m["d_model"], n_layers=m["n_layers"], n_heads=m["n_heads"],
                              mlp_hidden_size=m["mlp_hidden_size"], vocab_size=m["vocab_size"],
                              prompts=s["grpo_prompts"], num_generations=s["grpo_generations"],
                              prompt_length=s["prompt_length"], gen_length=s["gen_length"],
                              block_length=s["block_length"], steps=s["gen_length"], lora_r=s["lora_r"], seed=0,
                              dtype=dtype, threshold=0.9, cache="prefix")


def grpo_estimate(s: dict, device_type: str):
    """``dlm-align validate``'s estimate of the GRPO step (bf16 on CUDA, fp32 on CPU)."""
    dtype = "bfloat16" if device_type == "cuda" else "float32"
    return scale.memory_estimate(grpo_namespace(s, dtype), _config(s),
                                 dropout_mask_bytes=1 if device_type == "cuda" else 4)


def run_grpo(s: dict, device: torch.device) -> dict:
    """Part 3: one LoRA GRPO step with gradient checkpointing: seconds per part, peak memory vs the estimate."""
    ns = grpo_namespace(s, "bfloat16" if device.type == "cuda" else "float32")
    est = grpo_estimate(s, device.type)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = scale.build_policy(_config(s), lora_r=ns.lora_r, device=device, dtype=dtype)
    built = time.perf_counter() - t0
    prompts = torch.randint(0, s["model"]["eos_token_id"], (ns.prompts, ns.prompt_length), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
    peaks: dict[str, float | None] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def on_part(name: str) -> None:
        peaks[name] = float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None

    times = scale.grpo_step(model, prompts, num_generations=ns.num_generations, gen_length=ns.gen_length,
                            block_length=ns.block_length, steps=ns.steps, threshold=ns.threshold, cache=ns.cache,
                            on_part=on_part)
    peak = peaks.get("update")
    gib = 2**30
    print(f"\n## GRPO step (LoRA r{ns.lora_r}, gradient checkpointing, {dtype}, built in {built:.1f} s; "
          f"{ns.prompts} prompts x {ns.num_generations} generations, prompt {ns.prompt_length} + gen {ns.gen_length}, "
          f"threshold 0.9 + prefix cache rollout, coupled scoring)")
    print("| part | seconds | peak allocated so far, GiB |")
    print("| --- | ---: | ---: |")
    for part in ("rollout", "scoring", "update"):
        p = peaks.get(part)
        print(f"| {part} | {times[part]:.2f} | {'n/a' if p is None else f'{p / gib:.2f}'} |")
    ratio = None if peak is None else peak / est.total
    print(f"estimate (dlm-align validate): {est.total / gib:.2f} GiB; measured peak "
          f"{'n/a' if peak is None else f'{peak / gib:.2f} GiB ({ratio:.2f} of the estimate)'}", flush=True)
    return {"dtype": str(dtype), "build_seconds": built, "seconds": times, "peak_allocated_bytes": peaks,
            "estimate_total_bytes": est.total, "estimate_rows_bytes": {r.name: r.bytes for r in est.rows},
            "measured_over_estimate": ratio, "settings": {k: str(v) for k, v in vars(ns).items()}}


RUNNERS = {"kernel": run_kernel, "rollout": run_rollout, "grpo": run_grpo}


def dry_run(s: dict, parts: list[str]) -> dict:
    """Print what each part would run (shapes, sizes) and the GRPO step's memory estimate; run nothing."""
    from align.memory import architecture_from_config, human_count, param_count

    arch = architecture_from_config(_config(s))
    print(f"model: {human_count(param_count(arch))} params, d_model {arch.d_model}, {arch.n_layers} layers, "
          f"{arch.n_heads} heads, MLP {arch.mlp_hidden_size}, vocab {arch.vocab_size}")
    plan = {"parts": parts, "params": param_count(arch)}
    if "kernel" in parts:
        print(f"kernel: {s['kernel_rows']} x {arch.vocab_size} logits; chi-square on {s['kernel_draws']} draws")
    if "rollout" in parts:
        print(f"rollout: batch {s['batch']}, prompt {s['prompt_length']}, gen {s['gen_length']}, "
              f"block {s['block_length']}")
    if "grpo" in parts:
        est = grpo_estimate(s, "cuda")
        print(f"grpo: {s['grpo_prompts']} prompts x {s['grpo_generations']} generations; estimate on CUDA (bf16):")
        print(est.table())
        plan["grpo_estimate_bytes"] = est.total
    return plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the check."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=(*PARTS, "all"), help="which part to run ('all': every part, in order)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes; runs on CPU when no GPU is present")
    p.add_argument("--dry-run", action="store_true", help="print shapes and the memory estimate, run nothing")
    p.add_argument("--json", type=Path, default=None, help=f"merge results into this file (the .sh: {RESULTS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    s = shapes(args.tiny)
    if args.dry_run:
        _merge(args.json, "dry_run", dry_run(s, parts))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(NO_CUDA)
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        _merge(args.json, "device", {"name": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "cuda": torch.version.cuda})
    for part in parts:
        t0 = time.perf_counter()
        result = RUNNERS[part](s, device)
        result["wall_seconds"] = time.perf_counter() - t0
        result["tiny"] = args.tiny
        _merge(args.json, part, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
