"""Rollout benchmark: ``align.sampling.generate`` against the reference sampler, same run and settings.

Two models:

* (a) ``small-vocab``: a tiny LLaDA (the project's 143-token word tokenizer, d_model 128, 4 layers) on
  held-out prompts of the built-in arithmetic task, chat-formatted. Without ``--model-dir`` the model
  is given ``--train-steps`` of masked-diffusion SFT on the task first, so that its confidences look
  like a trained model's (a random model is never confident, which would make threshold decoding
  meaningless); with ``--model-dir`` a checkpoint and its tokenizer are used as they are.
* (b) ``llada-vocab``: random weights with LLaDA's 126,464-token vocabulary, d_model 256, 4 layers,
  64 prompt + 64 generated tokens, so that the output head costs what it costs for a real vocabulary.

Every configuration runs ``--repeats`` times, interleaved with the others; the table shows the best
wall time (tokens/s counts every generated position), the network evaluations, the peak memory growth
during the call (CPU: ``VmHWM`` of ``/proc/self/status`` after resetting it; CUDA:
``torch.cuda.max_memory_allocated``), the speed-up over the reference, and how many completion tokens
agree with the reference (and, on (a), the task accuracy). Results go to ``bench/results/rollout.json``.
Timings use one CPU thread by default (``--threads``), which keeps ratios stable on a shared machine.

    python bench/rollout.py                      # both models on CPU
    python bench/rollout.py --device cuda        # on a GPU (Triton sampling step)
    python bench/rollout.py --only a --model-dir data/checkpoints/quickstart-base --raw   # shipped base model
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

from align.data.collator import left_pad
from align.models import LLaDAModelLM, tiny_llada_config
from align.sampling import generate
from align.sampling.reference import reference_generate

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"


# ---------------------------------------------------------------------------------------------- memory
def _proc_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn, device: torch.device):
    """Run ``fn()``; return (seconds, peak memory growth in MiB or None, result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
            before = _proc_kb("VmRSS")
        except OSError:
            before = None
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        hwm = _proc_kb("VmHWM")
        peak = None if before is None or hwm is None else max(hwm - before, 0) / 1024
    return seconds, peak, out


# ---------------------------------------------------------------------------------------------- models
def train_briefly(model, tok, examples, gen_length: int, steps: int, seed: int) -> None:
    """Masked-diffusion SFT (``docs/concepts.md`` §1): mask completion tokens with p = (1−ε)t + ε, loss CE / p."""
    from align.data.formatting import encode_pair

    pairs = [encode_pair(tok, e["prompt"], e["completion"], use_chat_template=True) for e in examples]
    rows, prompt_lens = [], []
    for p, c in pairs:
        c = (c + [tok.eos_token_id] * gen_length)[:gen_length]  # EOS padding is trained (LLaDA)
        rows.append(p + c)
        prompt_lens.append(len(p))
    ids, att = left_pad(rows, tok.eos_token_id)
    P = ids.shape[1] - gen_length
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    batch = 16
    for _ in range(steps):
        b = torch.randint(0, ids.shape[0], (batch,), generator=g)
        x, a = ids[b], att[b]
        t = torch.rand(batch, 1, generator=g)
        p_mask = (1 - 1e-3) * t + 1e-3
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, P:] = torch.rand(batch, gen_length, generator=g) < p_mask
        z = torch.where(masked, torch.full_like(x, model.mask_token_id), x)
        logits = model(z, attention_mask=a).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")
        loss = ((ce * masked / p_mask).sum(1) / gen_length).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def small_vocab_suite(args, device):
    """(a): tiny model + arithmetic prompts. Returns model, ids, att, ids dict, tokenizer, answers."""
    from align.data.formatting import encode_prompt
    from align.data.task import arithmetic_dataset, corpus_for_tokenizer

    ds = arithmetic_dataset(num_train=2000, num_test=args.batch_a, seed=0)
    if args.model_dir:
        from align.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(args.model_dir, dtype=torch.float32)
        note = f"checkpoint {args.model_dir}"
    else:
        from align.data.tokenizer import build_word_tokenizer

        tok = build_word_tokenizer(corpus_for_tokenizer())
        cfg = tiny_llada_config(vocab_size=len(tok), d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384,
                                mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = LLaDAModelLM(cfg)
        t0 = time.perf_counter()
        train_briefly(model, tok, list(ds["train"]), args.gen_length, args.train_steps, args.seed)
        note = f"built in the bench, {args.train_steps} SFT steps ({time.perf_counter() - t0:.0f}s)"
    rows = [encode_prompt(tok, p, use_chat_template=not args.raw) for p in ds["test"]["prompt"]]
    ids, att = left_pad(rows, tok.eos_token_id)
    tokens = {"mask_id": model.mask_token_id, "eos_token_id": tok.eos_token_id,
              "eot_token_id": tok.convert_tokens_to_ids("<|eot_id|>")}
    return model.to(device).eval(), ids, att, tokens, tok, list(ds["test"]["answer"]), note


def llada_vocab_suite(args, device):
    """(b): LLaDA vocabulary, 4 layers of width 256, random prompts of 64 tokens."""
    cfg = tiny_llada_config(vocab_size=126464, d_model=256, n_layers=4, n_heads=4, mlp_hidden_size=768,
                            mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = LLaDAModelLM(cfg)
    ids = torch.randint(0, 126000, (args.batch_b, 64), generator=torch.Generator().manual_seed(args.seed))
    tokens = {"mask_id": 126336, "eos_token_id": 126081, "eot_token_id": 126348}
    return model.to(device).eval(), ids, None, tokens, None, None, "random weights"


# ---------------------------------------------------------------------------------------------- runs
MODES = {
    "reference": None,
    "exact": {},
    "exact, eos stop": {"eos_policy": "stop"},
    "prefix cache": {"cache": "prefix"},
    "threshold 0.9": {"threshold": 0.9},
    "threshold 0.9 + prefix": {"threshold": 0.9, "cache": "prefix"},
    "threshold 0.9 + dual": {"threshold": 0.9, "cache": "dual"},
    "threshold 0.9 + prefix, stop": {"threshold": 0.9, "cache": "prefix", "eos_policy": "stop"},
}


def run_suite(name: str, build, args, device) -> dict:
    model, ids, att, tok_ids, tokenizer, answers, note = build(args, device)
    ids = ids.to(device)
    att = None if att is None else att.to(device)
    common = dict(gen_length=args.gen_length, steps=args.gen_length, block_length=args.block_length,
                  temperature=args.temperature)
    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        modes = {**MODES, **{f"threshold {t:g} + prefix": {"threshold": t, "cache": "prefix"}
                             for t in args.extra_thresholds}}
        for mode, extra in modes.items():
            gen = torch.Generator().manual_seed(args.seed + rep)
            if extra is None:
                def fn(gen=gen):
                    return reference_generate(model, ids, att, **common, generator=gen, **tok_ids), args.gen_length
            else:
                def fn(gen=gen, extra=extra):
                    out = generate(model, ids, attention_mask=att, **common, generator=gen, mask_id=tok_ids["mask_id"],
                                   eos_token_id=tok_ids["eos_token_id"], eot_token_id=tok_ids["eot_token_id"],
                                   **extra)
                    return out.sequences, out.nfe
            seconds, peak, (seqs, nfe) = measure(fn, device)
            rec = best.setdefault(mode, {"seconds": float("inf"), "peak_mib": 0.0})
            rec.update(nfe=nfe, sequences=seqs)
            rec["seconds"] = min(rec["seconds"], seconds)
            rec["peak_mib"] = max(rec["peak_mib"], peak or 0.0) if peak is not None else None
            print(f"  [{name}] repeat {rep + 1}/{args.repeats} {mode:<30s} {seconds:8.2f}s", file=sys.stderr)
    return summarise(name, best, ids, tok_ids, tokenizer, answers, note, args)


def summarise(name, best, ids, tok_ids, tokenizer, answers, note, args) -> dict:
    P, n_rows = ids.shape[1], ids.shape[0]
    stops = torch.tensor([tok_ids["eos_token_id"], tok_ids["eot_token_id"]], device=ids.device)
    ref = best["reference"]["sequences"][:, P:]
    ref_seconds = best["reference"]["seconds"]
    rows = []
    for mode, rec in best.items():
        comp = rec["sequences"][:, P:]
        is_stop = torch.isin(ref, stops)
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(is_stop[:, 0], ref.shape[1],
                                                                                       dtype=torch.long))
        upto = torch.arange(ref.shape[1], device=ref.device)[None] <= first[:, None]  # text + first stop token
        row = {
            "mode": mode,
            "seconds": round(rec["seconds"], 4),
            "tokens_per_s": round(n_rows * args.gen_length / rec["seconds"], 1),
            "nfe": int(rec["nfe"]),
            "peak_mib": None if rec["peak_mib"] is None else round(rec["peak_mib"], 1),
            "speedup": round(ref_seconds / rec["seconds"], 2),
            "agreement": round(float(((comp == ref) & upto).sum() / upto.sum()), 4),
        }
        if tokenizer is not None and answers is not None:
            from align.data.task import is_correct

            texts = tokenizer.batch_decode(comp.cpu().tolist(), skip_special_tokens=True)
            row["accuracy"] = round(sum(is_correct(t, a) for t, a in zip(texts, answers)) / len(answers), 4)
        rows.append(row)
    return {"model": name, "note": note, "batch": n_rows, "prompt_length": P, "gen_length": args.gen_length,
            "block_length": args.block_length, "steps": args.gen_length, "temperature": args.temperature,
            "rows": rows}


def print_table(suite: dict) -> None:
    print(f"\n({suite['model']}) {suite['note']}; batch {suite['batch']}, prompt {suite['prompt_length']}, "
          f"gen {suite['gen_length']}, block {suite['block_length']}, steps {suite['steps']}, "
          f"T={suite['temperature']}")
    acc = "accuracy" in suite["rows"][0]
    head = f"{'mode':<30s} {'tok/s':>9s} {'nfe':>5s} {'peak MiB':>9s} {'speed-up':>9s} {'agree':>7s}"
    print(head + (f" {'acc':>6s}" if acc else ""))
    for r in suite["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        line = (f"{r['mode']:<30s} {r['tokens_per_s']:9.1f} {r['nfe']:5d} {peak:>9s} {r['speedup']:8.2f}x "
                f"{r['agreement']:7.3f}")
        print(line + (f" {r['accuracy']:6.3f}" if acc else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--only", choices=["a", "b"], default=None, help="run one of the two models")
    p.add_argument("--model-dir", default=None, help="checkpoint for (a) instead of the bench-trained tiny model")
    p.add_argument("--train-steps", type=int, default=600, help="SFT steps for the bench-built (a) model")
    p.add_argument("--raw", action="store_true", help="(a) prompts as plain text (for base checkpoints)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: stable timings on a shared machine; 0 = torch's default)")
    p.add_argument("--batch-a", type=int, default=16, help="prompts for (a)")
    p.add_argument("--batch-b", type=int, default=4, help="prompts for (b)")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-thresholds", type=float, nargs="*", default=[],
                   help="also run 'threshold τ + prefix' for each τ given (e.g. 0.99 0.999)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (best time is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suites = []
    if args.only in (None, "a"):
        suites.append(run_suite("a: small vocab", small_vocab_suite, args, device))
    if args.only in (None, "b"):
        suites.append(run_suite("b: LLaDA vocab", llada_vocab_suite, args, device))
    for s in suites:
        print_table(s)
    result = {
        "command": "python bench/rollout.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "suites": suites,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
