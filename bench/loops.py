"""Loop detection: precision / recall on the labelled set, and speed on a 1,024 x 512 batch.

    python bench/loops.py            # evaluate on bench/data/loops_eval.jsonl, time, write bench/results/loops.json
    python bench/loops.py --tune     # also print the parameter grid on the dev split (seed 1)

Methods compared on the same completions (make_loop_set.py):
- ``detect_loops`` on token ids (trailing EOS padding cut with ``pad_ids``), default parameters,
  a completion is flagged when any loop span is found;
- ``loop_penalty`` on the text alone (whitespace words, what a trainer without ids gets);
- TRL's n-gram repetition penalty (``trl.rewards.get_repetition_penalty_reward``, 3-grams, the
  open-r1 reward) on the same ids without the EOS padding (as TRL passes them). It yields a score,
  not a decision, so its threshold is tuned for F1 on the dev split (seed 1) and then applied to
  the evaluation set; the best threshold and n-gram size on the evaluation set itself (an oracle,
  flattering the baseline) are reported too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from trl.rewards import get_repetition_penalty_reward

from align.rewards import LoopPenalty, detect_loops, loop_coverage

sys.path.insert(0, str(Path(__file__).parent))
from make_loop_set import EOS_ID, build_vocab, generate, tokenize

ROOT = Path(__file__).parent


def load(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_ids(rows: list[dict]) -> list[list[int]]:
    """Token ids per row, EOS-padded up to ``gen_length`` when the completion ended (as a DLM emits them)."""
    vocab = build_vocab([r["text"] for r in rows])
    out = []
    for r in rows:
        ids = [vocab[t] for t in tokenize(r["text"])]
        if r["ended"]:
            ids += [EOS_ID] * max(1, r["gen_length"] - len(ids))
        out.append(ids)
    return out


def unpadded(ids: list[int]) -> list[int]:
    """Ids up to and including the first EOS (what TRL passes to reward functions)."""
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def prf(pred: list[bool], gold: list[int]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum((not p) and g for p, g in zip(pred, gold))
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn}


def per_kind(rows: list[dict], pred: list[bool]) -> dict[str, float]:
    """Share flagged per kind (recall for loop kinds, false-positive rate for the others)."""
    acc: dict[str, list[bool]] = defaultdict(list)
    for r, p in zip(rows, pred):
        acc[r["kind"]].append(p)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(acc.items())}


def ngram_scores(ids: list[list[int]], n: int) -> list[float]:
    reward = get_repetition_penalty_reward(ngram_size=n, max_penalty=-1.0)
    return [-s for s in reward(completion_ids=[unpadded(x) for x in ids])]


def best_threshold(scores: list[float], gold: list[int]) -> tuple[float, dict[str, float]]:
    best = (0.0, {"f1": -1.0})
    for t in sorted(set(scores)):
        m = prf([s >= t for s in scores], gold)
        if m["f1"] > best[1]["f1"]:
            best = (t, m)
    return best


def ours(ids: list[list[int]], **kw: int | None) -> list[bool]:
    return [r.has_loop for r in detect_loops(ids, pad_ids=(EOS_ID,), **kw)]


def tune(dev: list[dict], dev_ids: list[list[int]]) -> dict[str, list[dict]]:
    """F1 on the dev split: exact-repeat parameters first (no counters), then the counter rule on the best."""
    gold = [r["label"] for r in dev]

    def run(kw: dict) -> dict:
        cov = loop_coverage(dev_ids, pad_ids=(EOS_ID,), **kw)
        return {**kw, **prf((cov.fraction > 0).tolist(), gold)}

    exact = [
        run({"p_max": p, "k_min": k, "min_span": s, "k_counter": None})
        for p, k, s in itertools.product((16, 32, 64), (2, 3, 4), (12, 16, 20, 24, 32))
    ]
    # best F1 (to two decimals), then precision, then the cheaper / more conservative setting
    exact.sort(key=lambda g: (-round(g["f1"], 2), -g["precision"], g["p_max"], -g["min_span"], -g["k_min"]))
    best = {k: exact[0][k] for k in ("p_max", "k_min", "min_span")}
    counter = [
        run({**best, "k_counter": k, "counter_min_period": c})
        for k, c in itertools.product((4, 5, 6, 8, 10), (4, 6, 8, 10, 12))
    ]
    counter.sort(key=lambda g: (-round(g["f1"], 2), -g["precision"], -g["counter_min_period"], -g["k_counter"]))
    print("\ndev split, exact repeats only (top 8 by F1):")
    for g in exact[:8]:
        print(
            f"  p_max={g['p_max']:3d} k_min={g['k_min']} min_span={g['min_span']:2d}  "
            f"P={g['precision']:.3f} R={g['recall']:.3f} F1={g['f1']:.3f}"
        )
    print(f"dev split, with the counter rule on {best} (top 8 by F1):")
    for g in counter[:8]:
        print(
            f"  k_counter={g['k_counter']:2d} counter_min_period={g['counter_min_period']:2d}  "
            f"P={g['precision']:.3f} R={g['recall']:.3f} F1={g['f1']:.3f}"
        )
    return {"exact": exact, "counter": counter}


EDGE_CASES = {
    "sum of 8 equal terms": "So 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 = 56.",
    "sum of 12 equal terms": "So 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 + 7 = 84.",
    "8-column table separator": "| " + " | ".join(["---"] * 8) + " |",
    "12-column table separator": "| " + " | ".join(["---"] * 12) + " |",
    "16 zeros in a list": "w = [" + ", ".join(["0"] * 16) + "]",
    "laughter x8": "ha ha ha ha ha ha ha ha, very funny.",
    "same line 3 times": "print(x)\nprint(x)\nprint(x)\n",
    "chorus line 3 times": ("Row, row, row your boat, gently down the stream.\n" * 3).strip(),
    "Day 1..7, same body": " ".join(f"Day {i}: she reads 5 pages." for i in range(1, 8)),
    "Day 1..10, same body": " ".join(f"Day {i}: she reads 5 pages." for i in range(1, 11)),
    "word x20 (stutter)": "The " + "network " * 20 + "is large.",
    "word x30 (stutter)": "The " + "network " * 30 + "is large.",
    "Chapter 1..8": ", ".join(f"Chapter {i}" for i in range(1, 9)) + ".",
    "header Q1..Q8": "| Name | " + " | ".join(f"Q{i}" for i in range(1, 9)) + " |",
    "x[i] = 0 for i < 8": "".join(f"x[{i}] = 0\n" for i in range(8)),
    "assert f(i) == True, 8 lines": "".join(f"assert f({i}) == True\n" for i in range(8)),
}


def edge_cases() -> dict[str, dict[str, bool]]:
    """Hand-written boundary cases: which does the default detector flag (ids / text)?"""
    texts = list(EDGE_CASES.values())
    vocab = build_vocab(texts)
    by_ids = detect_loops([[vocab[t] for t in tokenize(s)] for s in texts])
    by_text = LoopPenalty().fractions(texts)
    out = {}
    print("\nboundary cases (flagged by ids / by text):")
    for (name, text), rep, f in zip(EDGE_CASES.items(), by_ids, by_text):
        out[name] = {"ids": rep.has_loop, "text": f > 0, "tokens": len(tokenize(text))}
        print(f"  {name:28s} {len(tokenize(text)):4d} tokens   ids={rep.has_loop!s:5s}  text={f > 0}")
    return out


def _batches() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(2, 50_000, (1024, 512), generator=gen)
    mixed, period1 = rand.clone(), rand.clone()
    start = torch.randint(0, 400, (1024,), generator=gen)
    for b in range(1024):  # every row ends in a loop of period 1..24 from a random start
        p, s = 1 + b % 24, int(start[b])
        mixed[b, s:] = mixed[b, s : s + p].repeat((512 - s) // p + 1)[: 512 - s]
    period1[:, 256:] = period1[:, 255:256]  # worst case: every row loops one token (matches at every p)
    return {"all_loops": mixed, "all_period1": period1, "random": rand}


def timing(ids: list[list[int]], reps: int = 7) -> dict[str, dict[str, float]]:
    """Seconds (median and min of ``reps``) per 1,024 x 512 batch, for several batch contents."""
    rows = [(x + [EOS_ID] * 512)[:512] for x in ids]
    batches = {"eval_mix": torch.tensor([rows[i % len(rows)] for i in range(1024)]), **_batches()}
    out: dict[str, dict[str, float]] = {}
    for name, batch in batches.items():
        for fn_name, fn in (("loop_coverage", loop_coverage), ("detect_loops", detect_loops)):
            fn(batch, pad_ids=(EOS_ID,))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(batch, pad_ids=(EOS_ID,))
                times.append(time.perf_counter() - t0)
            out[f"{fn_name}/{name}"] = {"median": round(statistics.median(times), 4), "min": round(min(times), 4)}
    reward = get_repetition_penalty_reward(ngram_size=3)
    lists = batches["eval_mix"].tolist()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        reward(completion_ids=lists)
        times.append(time.perf_counter() - t0)
    out["trl_ngram_penalty/eval_mix"] = {"median": round(statistics.median(times), 4), "min": round(min(times), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="loop detection benchmark")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "loops_eval.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loops.json")
    ap.add_argument("--tune", action="store_true", help="print the parameter grid on the dev split")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()

    rows, dev = load(args.data), generate(seed=1)
    ids, dev_ids = to_ids(rows), to_ids(dev)
    gold, dev_gold = [r["label"] for r in rows], [r["label"] for r in dev]
    print(f"evaluation set: {len(rows)} completions, {sum(gold)} loops; dev split: {len(dev)}")

    results: dict[str, dict] = {}
    pred = ours(ids)
    results["detect_loops (ids)"] = {**prf(pred, gold), "per_kind": per_kind(rows, pred)}
    pen = LoopPenalty()
    pred_text = [f > 0 for f in pen.fractions([r["text"] for r in rows])]
    results["loop_penalty (text only)"] = {**prf(pred_text, gold), "per_kind": per_kind(rows, pred_text)}

    t_dev, _ = best_threshold(ngram_scores(dev_ids, 3), dev_gold)
    scores = ngram_scores(ids, 3)
    pred_ng = [s >= t_dev for s in scores]
    results["trl ngram penalty (n=3, dev threshold)"] = {
        **prf(pred_ng, gold),
        "threshold": round(t_dev, 4),
        "per_kind": per_kind(rows, pred_ng),
    }
    oracle = max(((n, *best_threshold(ngram_scores(ids, n), gold)) for n in range(1, 9)), key=lambda x: x[2]["f1"])
    results["trl ngram penalty (oracle n, threshold on eval)"] = {
        **oracle[2],
        "n": oracle[0],
        "threshold": round(oracle[1], 4),
    }

    print(f"\n{'method':50s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
    for name, m in results.items():
        print(f"{name:50s} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f}")
    print("\nshare flagged per kind (loop kinds: recall; others: false-positive rate):")
    kinds = results["detect_loops (ids)"]["per_kind"]
    print(f"  {'kind':16s} {'ids':>6s} {'text':>6s} {'ngram':>6s}")
    for k in kinds:
        print(
            f"  {k:16s} {kinds[k]:6.3f} {results['loop_penalty (text only)']['per_kind'][k]:6.3f} "
            f"{results['trl ngram penalty (n=3, dev threshold)']['per_kind'][k]:6.3f}"
        )

    report: dict = {"n": len(rows), "n_loops": sum(gold), "methods": results, "edge_cases": edge_cases()}
    if args.tune:
        report["dev_grid"] = tune(dev, dev_ids)
    if not args.no_timing:
        report["timing_s"] = timing(ids)
        report["timing_threads"] = torch.get_num_threads()
        print(f"\nseconds per 1,024 x 512 batch ({torch.get_num_threads()} threads):")
        for k, v in report["timing_s"].items():
            print(f"  {k:40s} median {v['median']:.4f}   min {v['min']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
