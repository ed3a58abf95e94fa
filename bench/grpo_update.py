"""Cost of one GRPO policy update per likelihood estimator, with and without skipping zero-advantage rows.

One update is what :class:`align.trainers.grpo.DiffusionGRPOTrainer` does after a rollout: score the
completions under the current policy with the estimator's mask plan, form the clipped surrogate with the
group advantages, aggregate (``loss_type: grpo``) and backpropagate. Without a KL term, completions whose
advantage is 0 (groups whose rewards are all equal) add nothing to the loss, and the trainer leaves them
out of the plan (``MaskPlan.restricted_to``). The benchmark draws ``--groups`` groups of ``G`` completions
on the shipped quickstart model, marks ``--zero-std`` of the groups as constant (their advantages are 0)
and times the update for each estimator, all rows scored vs. only the rows with a signal. The baseline
is coupled-GRPO scoring every row; the loss and gradient of both variants are checked to agree.

    .venv/bin/python bench/grpo_update.py       # writes bench/results/grpo_update.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from align.likelihood import draw_masks, score_plan
from align.models import load_model
from align.trainers.grpo_math import aggregate, clipped_surrogate

RESULTS = Path("bench/results/grpo_update.json")
# (label, estimator, estimator_args)
ESTIMATORS: list[tuple[str, str, dict]] = [
    ("coupled (3 rows)", "coupled", {}),
    ("trace, 4 views", "trace", {"num_views": 4}),
    ("one_step (1 row)", "one_step", {}),
    ("elbo l-stratified, n=2", "elbo", {"sampler": "l_stratified", "num_samples": 2}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:quickstart-base", help="checkpoint to time (default: the shipped one)")
    p.add_argument("--groups", type=int, default=8, help="prompts per update")
    p.add_argument("--num-generations", type=int, default=8, help="G completions per prompt")
    p.add_argument("--prompt-length", type=int, default=48)
    p.add_argument("--completion-length", type=int, default=32)
    p.add_argument("--zero-std", type=float, default=0.6,
                   help="share of groups whose rewards are all equal (0.5-0.7 in the quickstart's logs)")
    p.add_argument("--repeats", type=int, default=5, help="timed updates per configuration (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def make_batch(args: argparse.Namespace, vocab: int, gen: torch.Generator):
    """Token ids, response mask, commit steps (a random decoding order per row) and advantages."""
    G, B = args.num_generations, args.groups * args.num_generations
    P, L = args.prompt_length, args.completion_length
    ids = torch.randint(6, vocab, (B, P + L), generator=gen)
    resp = torch.zeros(B, P + L, dtype=torch.bool)
    resp[:, P:] = True
    order = torch.rand(B, L, generator=gen).argsort(1)                  # position decoded at each step
    commit = torch.full((B, P + L), -1, dtype=torch.long)
    commit[:, P:] = order.argsort(1)                                     # step at which each position was decoded
    n_const = round(args.zero_std * args.groups)
    r = (torch.rand(args.groups, G, generator=gen) < 0.3).float()
    r[:n_const] = 0.0                                                     # constant groups: no signal
    r[n_const:, 0], r[n_const:, 1] = 1.0, 0.0                             # the others are mixed
    A = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)   # group-scaled advantages
    A = torch.where(r.std(1, keepdim=True) > 0, A, torch.zeros_like(A)).view(-1)
    return ids, resp, commit, A


def update(model, plan, A: torch.Tensor, P: int, L: int) -> tuple[float, torch.Tensor]:
    """One clipped-surrogate update at the first inner iteration (ρ = 1); returns (loss, flat gradient)."""
    model.zero_grad(set_to_none=True)
    logp = score_plan(model, plan).token_logp[:, P:]
    per_tok, _ = clipped_surrogate(logp, logp.detach(), A[:, None], 0.2, 0.2)
    loss = aggregate(per_tok, plan.response_mask[:, P:], "grpo", L)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=torch.float32).train()
    vocab = int(model.config.vocab_size)
    ids, resp, commit, A = make_batch(args, vocab, torch.Generator().manual_seed(args.seed))
    P, L = args.prompt_length, args.completion_length
    rows = []
    base_ms = None
    for label, estimator, settings in ESTIMATORS:
        extra = {"commit_step": commit} if estimator == "trace" else {}
        plan = draw_masks(ids, resp, estimator=estimator, generator=args.seed + 1, **extra, **settings)
        variants = {"all rows": plan, "skip A = 0": plan.restricted_to(A != 0)}
        results = {}
        for name, p in variants.items():
            update(model, p, A, P, L)                                   # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                loss, grad = update(model, p, A, P, L)
                times.append(time.perf_counter() - t0)
            results[name] = (sorted(times)[len(times) // 2] * 1e3, loss, grad)
        (ms_all, loss_all, g_all), (ms_skip, loss_skip, g_skip) = results["all rows"], results["skip A = 0"]
        same = abs(loss_all - loss_skip) <= 1e-5 * max(1.0, abs(loss_all)) and torch.allclose(g_all, g_skip,
                                                                                              atol=1e-6)
        if base_ms is None:
            base_ms = ms_all
        for name, ms in (("all rows", ms_all), ("skip A = 0", ms_skip)):
            n_rows = int((variants[name].coef != 0).any(1).sum())         # rows score_plan() runs
            rows.append({"estimator": label, "variant": name, "rows_scored": n_rows, "ms_per_update": ms,
                         "speedup_vs_baseline": base_ms / ms, "same_loss_and_gradient": same})
    print(f"{args.groups} groups x G={args.num_generations}, P={P}, L={L}, {args.zero_std:.0%} of groups constant, "
          f"{torch.get_num_threads()} thread(s); baseline: coupled, all rows")
    header = ("estimator", "variant", "rows", "ms/update", "vs baseline", "same grad")
    print(f"{header[0]:<26s} {header[1]:<11s} {header[2]:>5s} {header[3]:>10s} {header[4]:>12s} {header[5]:>10s}")
    for r in rows:
        print(f"{r['estimator']:<26s} {r['variant']:<11s} {r['rows_scored']:5d} {r['ms_per_update']:10.1f} "
              f"{r['speedup_vs_baseline']:11.2f}x {r['same_loss_and_gradient']!s:>10s}")
    result = {"command": "python bench/grpo_update.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "settings": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
