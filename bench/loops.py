"""Loop detection: precision / recall on real and synthetic labelled sets, and speed.

    python bench/loops.py            # both sets, timing; writes bench/results/loops.json
    python bench/loops.py --tune     # also the parameter grids on the dev splits

Real set (``bench/data/loops_real.jsonl``, built by ``make_loop_set.py --real``; labelling rules in
``bench/data/README.md``): LLaDA-8B-Instruct generations for GSM8K, MATH500, Countdown and Sudoku at 128,
256 and 512 tokens, labelled by reading. Settings are chosen on its dev split; the test split only reports.
Methods: the text path (``detect_text_loops``, what ``loop_penalty`` and evaluation use), the token-id
path (``detect_loops``) on two stand-in tokenizations (the released generations are text; ``bpe`` is the
byte-level-BPE-style pre-tokenizer of ``make_loop_set.py``, ``digits`` the same with one token per digit),
the previous detector (the periodic rule alone), and TRL's n-gram repetition penalty
(``trl.rewards.get_repetition_penalty_reward``) with its n-gram size and threshold chosen for F1 on dev.

Synthetic set (``bench/data/loops_eval.jsonl``, ``make_loop_set.py``), as before: the token-id path, the
text path and the TRL penalty (threshold tuned on the synthetic dev split, seed 1; and an oracle).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from trl.rewards import get_repetition_penalty_reward

from align.loops_text import TextLoopParams, detect_text_loops
from align.rewards import detect_loops, loop_coverage

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
    by_text = [r.fraction for r in detect_text_loops(texts)]
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


def timing_text(texts: list[str], n: int = 1024, reps: int = 3) -> dict[str, float]:
    """Seconds for the text path on ``n`` texts (the real generations, cycled)."""
    batch = [texts[i % len(texts)] for i in range(n)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        detect_text_loops(batch)
        times.append(time.perf_counter() - t0)
    return {"n": n, "median": round(statistics.median(times), 4), "min": round(min(times), 4)}


# ---------------------------------------------------------------------------------------------------- real set

_DIGIT_RUN = re.compile(r"\D+|\d")


def real_ids(rows: list[dict], digits: bool) -> list[list[int]]:
    """Token ids of the real texts under a stand-in tokenizer, EOS-padded to ``gen_length`` when they ended."""
    vocab: dict[str, int] = {}
    out = []
    for r in rows:
        toks = tokenize(r["text"])
        if digits:  # one token per digit, as LLaMA-style tokenizers split numbers
            toks = [p for t in toks for p in (_DIGIT_RUN.findall(t) if any(c.isdigit() for c in t) else [t])]
        ids = [vocab.setdefault(t, len(vocab) + 2) for t in toks]
        if r["ended"]:
            ids += [EOS_ID] * max(1, r["gen_length"] - len(ids))
        out.append(ids)
    return out


def breakdown(rows: list[dict], pred: list[bool]) -> dict[str, dict]:
    """P/R/F1 per task and per generation length; per loop kind the share flagged (recall)."""
    gold = [r["label"] for r in rows]
    out: dict[str, dict] = {}
    for key in ("task", "gen_length"):
        for v in sorted({r[key] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r[key] == v]
            m = prf([pred[i] for i in idx], [gold[i] for i in idx])
            out[f"{key}={v}"] = m if m["tp"] + m["fn"] else {"no_loops": len(idx), "fp": m["fp"]}
    for k in sorted({r["kind"] for r in rows if r["label"]}):
        idx = [i for i, r in enumerate(rows) if r["kind"] == k]
        out[f"kind={k}"] = {"recall": round(sum(pred[i] for i in idx) / len(idx), 3), "n": len(idx)}
    neg = [i for i, r in enumerate(rows) if not r["label"]]
    out["negatives"] = {"false_positive_rate": round(sum(pred[i] for i in neg) / max(len(neg), 1), 3), "n": len(neg)}
    sure = [i for i, r in enumerate(rows) if r["confidence"] != "low"]
    out["high+medium confidence"] = prf([pred[i] for i in sure], [gold[i] for i in sure])
    return out


def real_methods(rows: list[dict]) -> dict[str, list[bool]]:
    """Each detector's flags on ``rows`` (TRL excluded: it needs a threshold)."""
    bpe, dig = real_ids(rows, False), real_ids(rows, True)
    text = [r.has_loop for r in detect_text_loops([r["text"] for r in rows])]
    ids_bpe = ours(bpe)
    return {
        "detect_text_loops (text; loop_penalty, eval)": text,
        "detect_loops (ids, bpe)": ids_bpe,
        "detect_loops (ids, digits)": ours(dig),
        "text or ids (bpe)": [a or b for a, b in zip(text, ids_bpe)],
        "previous detector (periodic rule, bpe)": ours(bpe, copy_min_span=None),
    }


def trl_scores(rows: list[dict], n: int) -> list[float]:
    return ngram_scores(real_ids(rows, False), n)


def real_benchmark(rows: list[dict], tune_grid: bool) -> dict:
    """Precision / recall on the real test split (settings from dev), with breakdowns."""
    dev = [r for r in rows if r["split"] == "dev"]
    test = [r for r in rows if r["split"] == "test"]
    dev_gold, gold = [r["label"] for r in dev], [r["label"] for r in test]
    print(f"\nreal set: dev {len(dev)} ({sum(dev_gold)} loops), test {len(test)} ({sum(gold)} loops)")
    best = max(((n, *best_threshold(trl_scores(dev, n), dev_gold)) for n in range(1, 9)),
               key=lambda x: (x[2]["f1"], x[2]["precision"]))
    n_best, t_best = best[0], best[1]
    out: dict = {"n_dev": len(dev), "n_test": len(test), "test_loops": sum(gold), "methods": {}}
    for split, part in (("dev", dev), ("test", test)):
        g = [r["label"] for r in part]
        preds = real_methods(part)
        preds[f"trl ngram penalty (n={n_best}, threshold {t_best:.3f} from dev)"] = \
            [s >= t_best for s in trl_scores(part, n_best)]
        out["methods"][split] = {name: {**prf(p, g), **({"breakdown": breakdown(part, p)} if split == "test" else {})}
                                 for name, p in preds.items()}
    print(f"\n{'method (real test split)':58s} {'precision':>9s} {'recall':>7s} {'F1':>6s}   dev F1")
    for name, m in out["methods"]["test"].items():
        print(f"{name:58s} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f}   "
              f"{out['methods']['dev'][name]['f1']:.3f}")
    shown = [n for n in out["methods"]["test"] if n.startswith(("detect_text_loops", "detect_loops (ids, bpe)", "trl"))]
    bd = {n: out["methods"]["test"][n]["breakdown"] for n in shown}
    print("\ntest split by task, length (P/R/F1), loop kind (recall), negatives (false-positive rate):")
    heads = [("trl ngram" if n.startswith("trl") else n.split(" (")[0]) for n in shown]
    print(f"  {'':24s}" + "".join(f"{h:>22s}" for h in heads))
    for k in bd[shown[0]]:
        cells = []
        for n in shown:
            v = bd[n][k]
            cells.append(f"no loops, {v['fp']} FP" if "no_loops" in v else
                         f"{v['false_positive_rate']:.3f} of {v['n']}" if "false_positive_rate" in v else
                         f"{v['recall']:.2f} of {v['n']}" if "n" in v else
                         f"{v['precision']:.2f}/{v['recall']:.2f}/{v['f1']:.2f}")
        print(f"  {k:24s}" + "".join(f"{c:>22s}" for c in cells))
    text_name = shown[0]
    test_pred = {r["id"]: p for r, p in zip(test, real_methods(test)[text_name])}
    out["test_errors"] = {text_name: [r["id"] for r in test if test_pred[r["id"]] != r["label"]]}
    print(f"\ntext path errors on test: {out['test_errors'][text_name]}")
    if tune_grid:
        out["dev_grid"] = tune_real(dev)
    return out


def tune_real(dev: list[dict]) -> dict[str, list[dict]]:
    """Grids on the real dev split: text path, then the token-id copy rule (bpe ids)."""
    gold = [r["label"] for r in dev]
    texts = [r["text"] for r in dev]
    text_grid = []
    for mb, ml, ws, ns in itertools.product((16, 20, 24, 28, 32), (32, 40, 48, 56, 64), (0.6, 0.75, 0.9),
                                            (0.4, 0.5, 0.6)):
        if ml < mb:
            continue
        prm = TextLoopParams(min_block_words=mb, min_loop_words=ml, word_sim=ws, number_sim=ns)
        pred = [r.has_loop for r in detect_text_loops(texts, prm)]
        text_grid.append({"min_block_words": mb, "min_loop_words": ml, "word_sim": ws, "number_sim": ns,
                          **prf(pred, gold)})
    # best F1 (two decimals), then precision, then the more conservative setting
    text_grid.sort(key=lambda g: (-round(g["f1"], 2), -g["precision"], -g["min_block_words"], -g["min_loop_words"],
                                  -g["word_sim"], -g["number_sim"]))
    word_grid = []
    for ms in (9, 12, 15, 18, 21, 24, 30):
        pred = [r.has_loop for r in detect_text_loops(texts, TextLoopParams(word_min_span=ms))]
        word_grid.append({"word_min_span": ms, **prf(pred, gold)})
    ids = real_ids(dev, False)
    id_grid = []
    for ms, gap, w in itertools.product((16, 20, 24, 28, 32), (4, 8, 12), (4, 6, 8)):
        pred = ours(ids, copy_min_span=ms, copy_gap=gap, copy_ngram=w)
        id_grid.append({"copy_min_span": ms, "copy_gap": gap, "copy_ngram": w, **prf(pred, gold)})
    id_grid.sort(key=lambda g: (-round(g["f1"], 2), -g["precision"], -g["copy_min_span"], g["copy_gap"]))
    print("\nreal dev split, text path (top 8):")
    for g in text_grid[:8]:
        print(f"  min_block_words={g['min_block_words']:2d} min_loop_words={g['min_loop_words']:2d} "
              f"word_sim={g['word_sim']:.2f} number_sim={g['number_sim']:.1f}  "
              f"P={g['precision']:.3f} R={g['recall']:.3f} F1={g['f1']:.3f}")
    print("real dev split, text path, word_min_span (the other settings at their defaults):")
    for g in word_grid:
        print(f"  word_min_span={g['word_min_span']:2d}  P={g['precision']:.3f} R={g['recall']:.3f} F1={g['f1']:.3f}")
    print("real dev split, token-id copy rule on bpe ids (top 8):")
    for g in id_grid[:8]:
        print(f"  copy_min_span={g['copy_min_span']:2d} copy_gap={g['copy_gap']:2d} copy_ngram={g['copy_ngram']}  "
              f"P={g['precision']:.3f} R={g['recall']:.3f} F1={g['f1']:.3f}")
    return {"text": text_grid, "text_word_min_span": word_grid, "ids": id_grid}


def measure_speed(ids: list[list[int]], text_rows: list[dict]) -> dict:
    """Seconds per 1,024 x 512 batch of ids and per 1,024 texts, with the machine's load."""
    out = {"timing_s": timing(ids), "timing_text_s": timing_text([r["text"] for r in text_rows]),
           "timing_threads": torch.get_num_threads(), "timing_load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(f"\nseconds per 1,024 x 512 batch ({out['timing_threads']} threads, load average "
          f"{out['timing_load_avg']} at the end):")
    for k, v in out["timing_s"].items():
        print(f"  {k:40s} median {v['median']:.4f}   min {v['min']:.4f}")
    v = out["timing_text_s"]
    print(f"  detect_text_loops, {v['n']} real texts        median {v['median']:.4f}   min {v['min']:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="loop detection benchmark")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "loops_eval.jsonl")
    ap.add_argument("--real", type=Path, default=ROOT / "data" / "loops_real.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loops.json")
    ap.add_argument("--tune", action="store_true", help="print the parameter grid on the dev split")
    ap.add_argument("--no-timing", action="store_true", help="skip the speed runs, keep the figures already in --out")
    ap.add_argument("--timing-only", action="store_true", help="re-measure speed, keep the rest of --out")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the timing (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing_only:
        report = json.loads(args.out.read_text())
        report.update(measure_speed(to_ids(load(args.data)), load(args.real)))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return

    rows, dev = load(args.data), generate(seed=1)
    ids, dev_ids = to_ids(rows), to_ids(dev)
    gold, dev_gold = [r["label"] for r in rows], [r["label"] for r in dev]
    print(f"synthetic evaluation set: {len(rows)} completions, {sum(gold)} loops; dev split: {len(dev)}")

    results: dict[str, dict] = {}
    pred = ours(ids)
    results["detect_loops (ids)"] = {**prf(pred, gold), "per_kind": per_kind(rows, pred)}
    pred_text = [r.has_loop for r in detect_text_loops([r["text"] for r in rows])]
    results["detect_text_loops (text)"] = {**prf(pred_text, gold), "per_kind": per_kind(rows, pred_text)}
    pred_old = ours(ids, copy_min_span=None)
    results["previous detector (periodic rule only)"] = {**prf(pred_old, gold), "per_kind": per_kind(rows, pred_old)}

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
            f"  {k:16s} {kinds[k]:6.3f} {results['detect_text_loops (text)']['per_kind'][k]:6.3f} "
            f"{results['trl ngram penalty (n=3, dev threshold)']['per_kind'][k]:6.3f}"
        )

    report: dict = {"synthetic": {"n": len(rows), "n_loops": sum(gold), "methods": results},
                    "edge_cases": edge_cases()}
    if args.real.exists():
        report["real"] = real_benchmark(load(args.real), args.tune)
    if args.tune:
        report["synthetic"]["dev_grid"] = tune(dev, dev_ids)
    if not args.no_timing:
        report.update(measure_speed(ids, load(args.real) if args.real.exists() else rows))
    elif args.out.exists():  # keep the speed figures of the last timed run
        report.update({k: v for k, v in json.loads(args.out.read_text()).items() if k.startswith("timing")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
