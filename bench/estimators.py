"""Variance of ELBO estimators of ``B_θ − B_ref`` at equal forward passes (``docs/concepts.md`` §2, §4).

A tiny random-init LLaDA plays θ; the reference is the same weights with a small relative Gaussian
perturbation. For each estimator and budget ``n`` (rows per sequence per model), ``--reps`` independent
repetitions of ``B̂_θ(y|x) − B̂_ref(y|x)`` are drawn for every sequence; the table reports the mean, the
variance (per sequence, averaged over sequences) and the ratio against the naive t-sampled estimator with
independent draws for θ and ref. The exact ELBOs (all ``2^L`` masks) are printed as the reference value.

    .venv/bin/python bench/estimators.py            # writes bench/results/estimators.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from align.likelihood import draw_elbo_masks, exact_elbo, score_plan
from align.models import LLaDAModelLM, tiny_llada_config
from align.rng import make_generator

# (label, sampler, shared masks between θ and ref)
ESTIMATORS: list[tuple[str, str, bool]] = [
    ("t-sampled, independent", "t", False),
    ("t-sampled, shared", "t", True),
    ("l-stratified, independent", "l_stratified", False),
    ("l-stratified, shared", "l_stratified", True),
    ("quadrature (2 nodes), shared", "quadrature", True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--num-seqs", type=int, default=8, help="distinct (prompt, response) pairs")
    p.add_argument("--prompt-length", type=int, default=8)
    p.add_argument("--response-length", type=int, default=12, help="<= 16 for the exact ELBO")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8], help="rows per sequence n")
    p.add_argument("--reps", type=int, default=300, help="repetitions per estimator and budget")
    p.add_argument("--init-std", type=float, default=0.2, help="init std of the random model")
    p.add_argument("--perturb", type=float, default=0.05, help="ref = θ + perturb·std(param)·N(0,1)")
    p.add_argument("--micro-batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/estimators.json"))
    return p.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[LLaDAModelLM, LLaDAModelLM]:
    """θ (random init) and ref (θ with every parameter perturbed by ``perturb`` of its std)."""
    torch.manual_seed(args.seed)        # a script, not library code: seeds the model init only
    theta = LLaDAModelLM(tiny_llada_config(vocab_size=args.vocab, init_std=args.init_std)).eval()
    ref = copy.deepcopy(theta)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(args.perturb * p.std() * torch.randn(p.shape, generator=gen))
    return theta, ref


def estimate(model: LLaDAModelLM, ids: torch.Tensor, resp: torch.Tensor, sampler: str, n: int,
             gen: torch.Generator, micro: int) -> torch.Tensor:
    """``B̂`` of every row of ``ids`` under ``model`` with a fresh plan from ``gen``."""
    plan = draw_elbo_masks(ids, resp, generator=gen, sampler=sampler, num_samples=n)
    return score_plan(model, plan, micro_batch_size=micro, chunk_size=8192).seq_logp.double()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and write the JSON report."""
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    theta, ref = build_models(args)
    g = torch.Generator().manual_seed(args.seed + 2)
    S, P, L = args.num_seqs, args.prompt_length, args.response_length
    prompts = torch.randint(0, args.vocab - 2, (S, P), generator=g)
    responses = torch.randint(0, args.vocab - 2, (S, L), generator=g)

    exact_theta = torch.stack([exact_elbo(theta, prompts[s], responses[s]) for s in range(S)])
    exact_ref = torch.stack([exact_elbo(ref, prompts[s], responses[s]) for s in range(S)])
    exact_diff = (exact_theta - exact_ref)

    # every repetition of every sequence is one batch row: [reps·S, P + L]
    ids = torch.cat([prompts, responses], dim=1).repeat(args.reps, 1)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, P:] = True

    rows = []
    for n in args.budgets:
        theta_cache: dict[str, torch.Tensor] = {}
        for label, sampler, shared in ESTIMATORS:
            if sampler == "quadrature" and n < 2:
                continue
            start = time.perf_counter()
            if sampler not in theta_cache:       # θ's draws are the same for the shared and independent rows
                theta_cache[sampler] = estimate(theta, ids, resp, sampler, n, make_generator(args.seed, n, 0),
                                                args.micro_batch_size)
            b_theta = theta_cache[sampler]
            # shared: replay θ's generator stream, hence the same (t, mask) draws, under ref
            ref_gen = make_generator(args.seed, n, 0 if shared else 1)
            b_ref = estimate(ref, ids, resp, sampler, n, ref_gen, args.micro_batch_size)
            diff = (b_theta - b_ref).view(args.reps, S)
            rows.append({
                "estimator": label, "sampler": sampler, "shared_masks": shared, "n": n,
                "mean_diff": diff.mean().item(),
                "exact_diff": exact_diff.mean().item(),
                "var_diff": diff.var(dim=0).mean().item(),
                "mean_theta": b_theta.view(args.reps, S).mean().item(),
                "exact_theta": exact_theta.mean().item(),
                "var_theta": b_theta.view(args.reps, S).var(dim=0).mean().item(),
                "seconds": time.perf_counter() - start,
            })
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["sampler"] == "t" and not r["shared_masks"])
        row["var_ratio_vs_independent_t"] = base["var_diff"] / row["var_diff"]

    print(f"B_θ − B_ref over {args.reps} reps × {S} sequences (P={P}, L={L}, vocab={args.vocab}, "
          f"perturb={args.perturb}); exact mean diff {exact_diff.mean().item():+.4f}, "
          f"exact mean B_θ {exact_theta.mean().item():.3f}")
    header = (f"{'estimator':<30} {'n':>3} {'mean diff':>10} {'var diff':>10} {'ratio':>8} "
              f"{'mean B_θ':>9} {'var B_θ':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['estimator']:<30} {r['n']:>3} {r['mean_diff']:>+10.4f} {r['var_diff']:>10.4f} "
              f"{r['var_ratio_vs_independent_t']:>7.1f}x {r['mean_theta']:>9.3f} {r['var_theta']:>9.3f}")

    report = {
        "command": " ".join(["python bench/estimators.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "exact": {"theta": exact_theta.tolist(), "ref": exact_ref.tolist(), "mean_diff": exact_diff.mean().item()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
