"""Cost of the sampler's non-finite logit check (``align.sampling.select.check_logits``).

Before each sampling step the sampler checks the ``[N, V]`` logits of the positions it is about to decode. The
benchmark times the check against the sampling step it guards (``sample_step``, torch backend, greedy) on
LLaDA-vocabulary logits, and ``generate`` with and without the check on a small random model with LLaDA's
vocabulary (the output head, and so the logits, are most of each step there; with an 8B body the check is a
smaller share). Runs are interleaved and the best of ``--repeats`` is kept.

    .venv/bin/python bench/logit_check.py --threads 1     # writes bench/results/logit_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import align.sampling.select as select
from align.kernels.sampling_step import sample_step
from align.models import LLaDAModelLM, tiny_llada_config
from align.sampling import generate

RESULTS = Path("bench/results/logit_check.json")
VOCAB = 126464  # LLaDA's


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (seconds)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved generate runs per variant")
    ap.add_argument("--positions", type=int, default=128, help="rows of the logits timed alone")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.positions, VOCAB, generator=gen)
    check = select.check_logits
    t_check = best_of(lambda: check(logits, 0), 20)
    t_step = best_of(lambda: sample_step(logits, temperature=0.0, confidence="prob", exclude_token=5,
                                         backend="torch"), 20)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LLaDAModelLM(tiny_llada_config(vocab_size=VOCAB, d_model=256, n_layers=4, n_heads=4,
                                               mlp_hidden_size=512)).eval()
    prompts = torch.randint(0, 1000, (4, 64), generator=gen)

    def run(with_check: bool) -> float:
        select.check_logits = check if with_check else (lambda logits, step=None: None)
        try:
            t0 = time.perf_counter()
            generate(model, prompts, gen_length=64, steps=64, block_length=32,
                     generator=torch.Generator().manual_seed(0))
            return time.perf_counter() - t0
        finally:
            select.check_logits = check

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for with_check in (True, False):
            times[with_check].append(run(with_check))
    report = {
        "logits_shape": [args.positions, VOCAB], "check_s": t_check, "sample_step_s": t_step,
        "check_vs_step": t_check / t_step,
        "generate_with_check_s": min(times[True]), "generate_without_check_s": min(times[False]),
        "generate_ratio": min(times[True]) / min(times[False]),
        "threads": torch.get_num_threads(), "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{'what':<46} {'seconds':>9}")
    label = f"check_logits on [{args.positions}, {VOCAB}]"
    print(f"{label:<46} {t_check:>9.4f}")
    print(f"{'sample_step (torch, greedy) on the same':<46} {t_step:>9.4f}   check / step = {t_check / t_step:.3f}")
    label = f"generate, with the check (best of {args.repeats})"
    print(f"{label:<46} {min(times[True]):>9.3f}")
    print(f"{'generate, without the check':<46} {min(times[False]):>9.3f}   ratio = {report['generate_ratio']:.3f}")
    print(f"({report['threads']} threads, load average {report['load_avg']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
