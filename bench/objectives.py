"""One protocol for comparing policy objectives, estimators and rollout modes (docs/benchmarks.md, "Objectives").

Every variant starts from the same SFT checkpoint and runs the same GRPO stage of a recipe (the same prompts
per step, rewards, sampler settings, steps, learning rate and held-out evaluation); only the keys of the
variant change. Each (variant, seed) is one ``dlm-align run`` with ``stages: [grpo]`` and ``eval.base: true``,
so its report holds the SFT model's and the GRPO model's results on the same held-out problems and the paired
McNemar test between them. The seed changes the rollouts, the masks and the order of the prompts.

    python bench/objectives.py --data loops --seeds 0 1 2                  # the quickstart (loop-prone SFT data)
    python bench/objectives.py --data clean --variants grpo/coupled,spg/block
    python bench/objectives.py --sft runs/quickstart/sft/final ...        # reuse an SFT checkpoint
    python bench/objectives.py --list                                     # the variants and their keys

Without ``--sft`` the SFT stage of the data setting's recipe runs once (``<out>/<data>/sft``). The table (mean
and spread over seeds of the held-out gain in points, the paired p-values, the loop rate after GRPO, seconds per
GRPO step and the rollouts' share of it) is printed and written to ``bench/results/objectives-<data>.md``; every run's
figures to ``bench/results/objectives-<data>.json`` (the runs themselves stay under ``--out``). A run already
finished in ``<out>`` is read back, not run again, when its recorded recipe is the one this invocation would run
(otherwise it stops: other settings need another ``--out``). Recipe keys for every run go before ``--seeds``
or after ``--``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from align.config import STAGES, config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"loops": ROOT / "recipes" / "quickstart.yaml", "clean": ROOT / "recipes" / "quickstart-clean.yaml"}
OUT = ROOT / "runs" / "bench-objectives"
RESULTS = ROOT / "bench" / "results"

#: name -> recipe overrides. The estimator and its arguments are always given, so no variant inherits the recipe's.
#: spg, wd1 and espo use their papers' advantage (no division by the group's std).
VARIANTS: dict[str, list[str]] = {
    "grpo/trace": ["grpo.loss_type=grpo", "grpo.estimator=trace", "grpo.estimator_args={num_views: 4}"],
    "grpo/trace+hints": ["grpo.loss_type=grpo", "grpo.estimator=trace", "grpo.estimator_args={num_views: 4}",
                         "grpo.hint_column=completion", "grpo.hint_reward=task_accuracy"],
    "grpo/one_step": ["grpo.loss_type=grpo", "grpo.estimator=one_step", "grpo.estimator_args={}"],
    "grpo/coupled": ["grpo.loss_type=grpo", "grpo.estimator=coupled", "grpo.estimator_args={}"],
    "grpo/elbo": ["grpo.loss_type=grpo", "grpo.estimator=elbo", "grpo.estimator_args={num_samples: 2}"],
    "spg/block": ["grpo.loss_type=spg", "grpo.estimator=block", "grpo.estimator_args={num_samples: 2}",
                  "grpo.scale_rewards=none"],
    "wd1/one_step": ["grpo.loss_type=wd1", "grpo.estimator=one_step", "grpo.estimator_args={}",
                     "grpo.scale_rewards=none"],
    "espo/elbo": ["grpo.loss_type=espo", "grpo.estimator=elbo", "grpo.estimator_args={num_samples: 2}",
                  "grpo.scale_rewards=none"],
    # rollout modes during RL, with the quickstart's objective
    "grpo/trace exact": ["grpo.loss_type=grpo", "grpo.estimator=trace", "grpo.estimator_args={num_views: 4}",
                         "grpo.cache=null"],
    "grpo/trace threshold0.9+prefix": ["grpo.loss_type=grpo", "grpo.estimator=trace",
                                       "grpo.estimator_args={num_views: 4}", "grpo.cache=prefix",
                                       "grpo.threshold=0.9"],
}


def _slug(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_").replace("+", "-")


def _cli(args: list[str], log: Path) -> None:
    """``dlm-align`` in a subprocess, its output to ``log``; raises with the log's tail when it fails."""
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "align.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"dlm-align {' '.join(args[:3])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def one_stage(recipe: Path, stage: str, out: Path, model: Path | None = None) -> Path:
    """A copy of ``recipe`` (under ``out``) that runs ``stage`` alone: the other stages' sections are left out, and
    with ``model`` the stage starts from that checkpoint (its tokenizer too, unless the recipe names one)."""
    raw = yaml.safe_load(recipe.read_text())
    for other in STAGES:
        if other != stage:
            raw.pop(other, None)
    raw["stages"] = [stage]
    if model is not None:
        raw["model"].pop("init_config", None)
        raw["model"]["path"] = str(model)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{recipe.stem}-{stage}.yaml"
    path.write_text(f"# dlm-align run {recipe.name}, stage {stage} alone (bench/objectives.py)\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return path


def sft_checkpoint(recipe: Path, out: Path, extra: list[str]) -> Path:
    """The recipe's SFT stage, run once under ``out/sft`` (its ``final`` is reused when present)."""
    final = out / "sft" / "sft" / "final"
    if not (final / "config.json").is_file():
        _cli(["run", str(one_stage(recipe, "sft", out)), "eval.enabled=false", f"output_dir={out / 'sft'}", *extra],
             out / "sft.log")
    return final


def _mean_key(history: list[dict], key: str) -> float | None:
    vals = [h[key] for h in history if key in h]
    return sum(vals) / len(vals) if vals else None


def read_back_mismatches(recorded: dict, stage_recipe: Path, seed: int, keys: list[str]) -> list[str]:
    """Where a finished run's recorded recipe differs from the recipe this invocation would run (``stage_recipe``
    with the seed and every ``key=value`` of the variant and the extra overrides); empty when it is the same run."""
    cfg = load_config(stage_recipe, [f"seed={seed}", "eval.base=true", *keys])
    expected = json.loads(json.dumps(config_to_dict(cfg), default=str))
    return [f"{key} is {have!r}, not {want!r}" for key, have, want in _differences(recorded, expected)
            if key not in ("output_dir", "run_name")]


def _differences(have: object, want: object, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in dict.fromkeys([*want, *have])
                for d in _differences(have.get(k), want.get(k), f"{prefix}{k}.")]
    return [] if have == want else [(prefix.rstrip("."), have, want)]


def run_variant(recipe: Path, sft: Path, out: Path, name: str, seed: int, extra: list[str]) -> dict:
    """One (variant, seed): GRPO from ``sft``, evaluated before and after; its figures."""
    run = out / _slug(name) / f"seed{seed}"
    report_path = run / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "grpo" in report.get("stages", {}):
        wall = load = None                            # read back: the time and load of that run are not known here
        wrong = read_back_mismatches(report["recipe"], one_stage(recipe, "grpo", out, sft), seed,
                                     VARIANTS[name] + extra)
        if wrong:                                     # a finished run of other settings sits in this folder
            raise SystemExit(f"{run} holds a finished run of other settings ({'; '.join(wrong)}); give another "
                             "--out for these settings")
    else:
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        _cli(["run", str(one_stage(recipe, "grpo", out, sft)), f"seed={seed}", f"output_dir={run}",
              "eval.base=true", *VARIANTS[name], *extra], run.parent / f"seed{seed}.log")
        wall, load = time.perf_counter() - t0, os.getloadavg()[0]
        report = json.loads(report_path.read_text())
    recipe_used = report["recipe"]
    before, after = report["stages"]["base"], report["stages"]["grpo"]
    test = report["comparisons"]["grpo_vs_base"]          # paired McNemar test on the same held-out problems
    history = json.loads((run / "grpo" / "log_history.json").read_text())
    steps = int(recipe_used["grpo"]["max_steps"])
    return {
        "variant": name, "seed": seed, "overrides": VARIANTS[name] + extra,
        "sft_accuracy": before["accuracy"], "grpo_accuracy": after["accuracy"],
        "gain_points": 100 * (after["accuracy"] - before["accuracy"]), "p_value": test["p_value"],
        "sft_loop_rate": before.get("loop_rate"), "loop_rate": after.get("loop_rate"),
        "seconds_per_step": report["seconds"]["grpo"] / steps,
        "rollout_share": _mean_key(history, "rollout/time_share"),
        "wall_seconds": wall, "load_average_after": load,
    }


def table(rows: list[dict]) -> str:
    """Markdown table: one line per variant, mean and spread over its seeds."""
    lines = ["| variant | seeds | held-out gain, points (mean ± sd) | per seed | p (paired) | loop rate after | "
             "s / GRPO step | rollout share |", "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        gains = [r["gain_points"] for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        share = [r["rollout_share"] for r in rs if r["rollout_share"] is not None]
        per_seed = ", ".join(f"{g:+.1f}" for g in gains)
        p_values = ", ".join(f"{r['p_value']:.2g}" for r in rs)
        lines.append(
            f"| {name} | {len(rs)} | {statistics.mean(gains):+.1f} ± {sd:.1f} | {per_seed} | {p_values} | "
            f"{100 * statistics.mean(r['loop_rate'] for r in rs):.1f}% | "
            f"{statistics.mean(r['seconds_per_step'] for r in rs):.2f} | "
            f"{(100 * statistics.mean(share)) if share else float('nan'):.0f}% |")
    return "\n".join(lines)


def merged(path: Path, rows: list[dict], sft: Path, overrides: list[str]) -> list[dict]:
    """``rows`` after the rows of an earlier results file ``path`` for the (variant, seed) pairs not in ``rows``;
    that file must come from the same SFT checkpoint and overrides, so the table compares like with like."""
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    if (Path(old["sft"]).resolve(), old["overrides"]) != (sft.resolve(), overrides):
        raise SystemExit(f"--merge: {path} holds runs from {old['sft']} with overrides {old['overrides']}, not from "
                         f"{sft} with {overrides}; write to another --results folder")
    made = {(r["variant"], r["seed"]) for r in rows}
    return [r for r in old["rows"] if (r["variant"], r["seed"]) not in made] + rows


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed; put recipe overrides before --seeds or after "
                                         "-- (--seeds 0 1 2 -- key=value)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=tuple(RECIPES), default="loops",
                   help="loops: the quickstart (30%% of SFT solutions loop); clean: quickstart-clean")
    p.add_argument("--recipe", type=Path, default=None, help="another recipe instead of the data setting's")
    p.add_argument("--sft", type=Path, default=None, help="the SFT checkpoint every variant starts from (default: "
                   "run the recipe's SFT stage once)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (--list shows them)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1, 2], help="GRPO seeds (default 0 1 2); recipe "
                   "overrides go before --seeds or after --")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder of the runs (default {OUT.relative_to(ROOT)})")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the table and the JSON (default "
                   f"{RESULTS.relative_to(ROOT)})")
    p.add_argument("--merge", action="store_true", help="keep the rows of the results JSON already there for the "
                   "(variant, seed) pairs this run does not make (the same SFT checkpoint and overrides, or an error)")
    p.add_argument("--list", action="store_true", help="print the variants and their keys, and exit")
    p.add_argument("overrides", nargs="*", help="recipe keys for every run (key=value), e.g. grpo.max_steps=40")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, keys in VARIANTS.items():
            print(f"{name:32s} {' '.join(keys)}")
        return 0
    recipe = args.recipe or RECIPES[args.data]
    out = args.out / (args.recipe.stem if args.recipe else args.data)
    sft = args.sft or sft_checkpoint(recipe, out, args.overrides)
    rows = []
    names = args.variants.split(",")
    for i, name in enumerate(names):
        for seed in args.seeds:
            print(f"[{i + 1}/{len(names)}] {name} seed {seed} ...", flush=True)
            rows.append(run_variant(recipe, sft, out, name, seed, args.overrides))
            r = rows[-1]
            print(f"    gain {r['gain_points']:+.1f} points (p = {r['p_value']:.2g}), loop rate {r['loop_rate']:.3f}, "
                  f"{r['seconds_per_step']:.2f} s/step", flush=True)
    name = f"objectives-{args.recipe.stem if args.recipe else args.data}"
    if args.merge:
        rows = merged(args.results / f"{name}.json", rows, sft, args.overrides)
    text = table(rows)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}.md").write_text(text + "\n")
    (args.results / f"{name}.json").write_text(json.dumps({"recipe": str(recipe), "sft": str(sft),
                                                           "overrides": args.overrides, "rows": rows}, indent=2) + "\n")
    print(f"results: {args.results / (name + '.json')}; table: {args.results / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
