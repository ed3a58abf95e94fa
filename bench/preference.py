"""Variance of the VRPO preference score at equal budget, with and without each variance-reduction trick.

The preference score of a pair ``(x, y_w, y_l)`` is ``β h = β[(B̂_θ − B̂_ref)(y_w) − (B̂_θ − B̂_ref)(y_l)]``
(``docs/concepts.md`` §4). A tiny random-init LLaDA plays θ and the reference is θ with every parameter perturbed
(so the two differ). Every estimator spends the same budget: ``n`` masked views per sequence and model. The tricks:

* **allocation**: ``1 × n`` (one masking ratio t per sequence, n masks at it) against ``n × 1`` (n ratios, one mask
  each: VRPO's optimal allocation);
* **stratification**: the n ratios drawn independently, ``t_j = (j + u)/n`` with one offset u (stratified t), or
  the l-stratified counts of ``draw_elbo_masks(sampler="l_stratified")`` (stratified and exact masked-token counts);
* **antithetic sharing**: θ and ref score independent draws, or the same (t, mask) draws.

For each row, ``--reps`` repetitions of every pair give the variance of ``β h`` (per pair, averaged over pairs);
``ratio`` is the variance of naive independent draws (``1 × n``, independent) divided by the row's. The exact ELBOs
(all masks) give the exact score, and ``est. var`` is the trainer's in-sample estimate (``preference/score_variance``:
``n · s²`` of the per-view terms), averaged over repetitions.

    .venv/bin/python bench/preference.py            # writes bench/results/preference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from align.likelihood import MaskPlan, draw_elbo_masks, exact_elbo, score_plan
from align.rng import make_generator
from align.trainers.vrpo_math import score_variance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimators import build_models  # θ and a perturbed ref, as the estimator benchmark builds them

# (label, how the n views are drawn, shared draws between θ and ref)
ROWS: list[tuple[str, str, bool]] = [
    ("naive: 1 t x n masks, independent", "one_t", False),
    ("allocation: n t x 1 mask, independent", "t", False),
    ("allocation + stratified t, independent", "t_stratified", False),
    ("allocation + l-stratified, independent", "l_stratified", False),
    ("antithetic: 1 t x n masks, shared", "one_t", True),
    ("allocation + antithetic, shared", "t", True),
    ("allocation + stratified t + antithetic", "t_stratified", True),
    ("allocation + l-stratified + antithetic (VRPO)", "l_stratified", True),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--num-pairs", type=int, default=8, help="distinct (prompt, chosen, rejected) triples")
    p.add_argument("--prompt-length", type=int, default=8)
    p.add_argument("--chosen-length", type=int, default=12, help="<= 16 for the exact ELBO")
    p.add_argument("--rejected-length", type=int, default=10, help="<= 16 for the exact ELBO")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8], help="views per sequence and model n")
    p.add_argument("--reps", type=int, default=300, help="repetitions per row and budget")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--init-std", type=float, default=0.2, help="init std of the random model")
    p.add_argument("--perturb", type=float, default=0.05, help="ref = θ + perturb·std(param)·N(0,1)")
    p.add_argument("--micro-batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/preference.json"))
    return p.parse_args(argv)


def t_plan(ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor, gen: torch.Generator, n: int, mode: str
           ) -> MaskPlan:
    """A t-sampled ELBO plan of ``n`` rows per sequence: ``one_t`` (one ratio, n masks), ``t`` (n independent ratios)
    or ``t_stratified`` (``t_j = (j + u)/n``); each token masked with probability t, coefficient ``1/(n·t)``."""
    B, T = ids.shape
    num_t = 1 if mode == "one_t" else n
    u = torch.rand(B, num_t, generator=gen, dtype=torch.float64)
    t = (torch.arange(num_t, dtype=torch.float64) + u) / num_t if mode == "t_stratified" else u
    t_rows = t.repeat_interleave(n // num_t, dim=1).reshape(-1)                     # [B·n]
    rows_resp = resp.repeat_interleave(n, dim=0)
    masked = rows_resp & (torch.rand(B * n, T, generator=gen, dtype=torch.float64) < t_rows[:, None])
    coef = masked.double() / (n * t_rows.clamp_min(1e-300))[:, None]
    row_seq = torch.arange(B).repeat_interleave(n)
    return MaskPlan(f"elbo/{mode}", ids, att, resp, row_seq, masked, coef.float(),
                    t_rows.float(), n)


def draw(ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor, gen: torch.Generator, n: int, mode: str
         ) -> MaskPlan:
    """The plan of one row of the table."""
    if mode == "l_stratified":
        return draw_elbo_masks(ids, resp, generator=gen, attention_mask=att, sampler="l_stratified", num_samples=n)
    return t_plan(ids, att, resp, gen, n, mode)


def pair_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompts [S, P], chosen [S, Lw], rejected [S, Ll])`` of random tokens (the mask id is never used)."""
    g = torch.Generator().manual_seed(args.seed + 2)
    S, P = args.num_pairs, args.prompt_length
    high = args.vocab - 2
    return (torch.randint(0, high, (S, P), generator=g), torch.randint(0, high, (S, args.chosen_length), generator=g),
            torch.randint(0, high, (S, args.rejected_length), generator=g))


def sequences(prompts: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, reps: int, pad: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reps`` copies of every pair as sequences ``2k`` (chosen) and ``2k + 1`` (rejected), right padded:
    ``(ids, attention_mask, response_mask)``; padding is not attended, so each sequence is scored as alone."""
    S, P = prompts.shape
    T = P + max(chosen.shape[1], rejected.shape[1])
    ids = torch.full((2 * S, T), pad, dtype=torch.long)
    resp = torch.zeros(2 * S, T, dtype=torch.bool)
    att = torch.zeros(2 * S, T, dtype=torch.bool)
    for s in range(S):
        for k, y in enumerate((chosen[s], rejected[s])):
            ids[2 * s + k, :P], ids[2 * s + k, P:P + len(y)] = prompts[s], y
            resp[2 * s + k, P:P + len(y)] = True
            att[2 * s + k, :P + len(y)] = True
    return ids.repeat(reps, 1), att.repeat(reps, 1), resp.repeat(reps, 1)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and write the JSON report."""
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    theta, ref = build_models(args)
    prompts, chosen, rejected = pair_batch(args)
    S, beta = args.num_pairs, args.beta
    exact = torch.zeros(S, dtype=torch.float64)
    for s in range(S):
        for k, y in enumerate((chosen[s], rejected[s])):
            diff = exact_elbo(theta, prompts[s], y).double() - exact_elbo(ref, prompts[s], y).double()
            exact[s] += beta * diff * (1 if k == 0 else -1)
    ids, att, resp = sequences(prompts, chosen, rejected, args.reps, pad=0)    # 2·S rows per repetition

    rows = []
    for n in args.budgets:
        for label, mode, shared in ROWS:
            start = time.perf_counter()
            plan = draw(ids, att, resp, make_generator(args.seed, n, 0), n, mode)
            ref_plan = plan if shared else draw(ids, att, resp, make_generator(args.seed, n, 1), n, mode)
            est_theta = score_plan(theta, plan, micro_batch_size=args.micro_batch_size, chunk_size=8192)
            est_ref = score_plan(ref, ref_plan, micro_batch_size=args.micro_batch_size, chunk_size=8192)
            seq = (est_theta.seq_logp.double() - est_ref.seq_logp.double()).view(args.reps, S, 2)
            score = beta * (seq[..., 0] - seq[..., 1])                               # [reps, S]
            views = (args.reps * S, 2, n)                                           # each view's contribution
            est_var = score_variance(est_theta.row_logp.view(views), est_ref.row_logp.view(views), beta)
            est_var = est_var.view(args.reps, S)
            rows.append({"estimator": label, "draws": mode, "shared": shared, "n": n,
                         "mean_score": score.mean().item(), "exact_score": exact.mean().item(),
                         "var_score": score.var(dim=0).mean().item(),
                         "estimated_var": est_var.mean().item() if n > 1 else None,
                         "seconds": time.perf_counter() - start})
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["draws"] == "one_t" and not r["shared"])
        row["var_ratio_vs_naive"] = base["var_score"] / row["var_score"]

    print(f"β h over {args.reps} reps x {S} pairs (P={args.prompt_length}, L_w={args.chosen_length}, "
          f"L_l={args.rejected_length}, vocab={args.vocab}, perturb={args.perturb}, β={beta}); exact mean β h "
          f"{exact.mean().item():+.4f}")
    header = f"{'estimator':<48} {'n':>3} {'mean βh':>9} {'var βh':>11} {'ratio':>9} {'est. var':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        est = f"{r['estimated_var']:>11.5f}" if r["estimated_var"] is not None else f"{'-':>11}"
        print(f"{r['estimator']:<48} {r['n']:>3} {r['mean_score']:>+9.4f} {r['var_score']:>11.5f} "
              f"{r['var_ratio_vs_naive']:>8.1f}x {est}")

    report = {
        "command": " ".join(["python bench/preference.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "exact": {"score": exact.tolist(), "mean_score": exact.mean().item()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
