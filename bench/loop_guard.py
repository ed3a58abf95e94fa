"""Decode-time loop guard: loop rate and accuracy with and without it, on held-out arithmetic problems.

    python bench/loop_guard.py --model runs/quickstart-loops/sft/final
    python bench/loop_guard.py --model DIR --num-problems 500 --gen-length 64 --penalties 0 2 5 10

Each setting decodes the same problems with the same sampler settings (greedy by default) through
:func:`align.evaluate.evaluate`; only ``eval.loop_guard`` changes. Prints a table (loop rate, mean loop
fraction, accuracy, completion length, time, time ratio against no guard) and writes JSON
(``--out``, default ``bench/results/loop_guard.json``). Loops are counted by
:func:`align.rewards.detect_loops` on the tokens before the first stop, with ``--min-span``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from align.config import EvalConfig
from align.data.task import arithmetic_dataset
from align.evaluate import evaluate
from align.models import load_model_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--num-problems", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--seed", type=int, default=0, help="task seed of the held-out split (default 0)")
    ap.add_argument("--gen-length", type=int, default=64, help="generation budget in tokens (default 64)")
    ap.add_argument("--block-length", type=int, default=32, help="block length (default 32)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    ap.add_argument("--penalties", type=float, nargs="+", default=[0.0, 5.0],
                    help="guard penalties λ to try besides 'off' (default 0 5)")
    ap.add_argument("--max-remasks", type=int, default=2, help="guard max_remasks (default 2)")
    ap.add_argument("--min-span", type=int, default=24, help="loop detection min_span, guard and metric (default 24)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/loop_guard.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    test = arithmetic_dataset(1, args.num_problems, seed=args.seed)["test"]
    prompts, answers = list(test["prompt"]), list(test["answer"])
    detection = {"min_span": args.min_span}
    settings: list[tuple[str, dict]] = [("off", {})]
    settings += [(f"guard λ={lam:g}", {"enabled": True, "penalty": lam, "max_remasks": args.max_remasks,
                                         "detection": detection}) for lam in args.penalties]
    rows = []
    for name, guard in settings:
        cfg = EvalConfig(num_problems=len(prompts), batch_size=args.batch_size, gen_length=args.gen_length,
                         steps=args.gen_length, block_length=args.block_length, temperature=args.temperature,
                         loop_detection=detection, loop_guard=guard)
        t0 = time.perf_counter()
        res = evaluate(model, tok, prompts, answers, cfg, seed=args.seed, desc=name)
        dt = time.perf_counter() - t0
        rows.append({"setting": name, "loop_rate": res.loop_rate, "mean_loop_fraction": res.mean_loop_fraction,
                     "accuracy": res.accuracy, "mean_completion_length": res.mean_completion_length,
                     "seconds": dt})
    base_t = rows[0]["seconds"]
    print(f"\nmodel {args.model}: {len(prompts)} held-out problems, gen_length {args.gen_length}, "
          f"block {args.block_length}, T={args.temperature:g}, min_span {args.min_span}")
    print(f"{'setting':<14} {'loop rate':>9} {'loop frac':>9} {'accuracy':>9} {'length':>7} {'time s':>7} {'x off':>6}")
    for r in rows:
        print(f"{r['setting']:<14} {r['loop_rate']:>9.1%} {r['mean_loop_fraction']:>9.3f} {r['accuracy']:>9.1%} "
              f"{r['mean_completion_length']:>7.1f} {r['seconds']:>7.1f} {r['seconds'] / base_t:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "num_problems": len(prompts), "gen_length": args.gen_length,
                               "block_length": args.block_length, "temperature": args.temperature,
                               "min_span": args.min_span, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
