"""The run report (``<output_dir>/report.json``): per-stage results, paired comparisons, the printed table."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from align.config import RecipeConfig
from align.stats import mcnemar_exact


def report_path(cfg: RecipeConfig) -> Path:
    """Where the run's report lives."""
    return Path(cfg.output_dir) / "report.json"


def load_report(cfg: RecipeConfig) -> dict[str, Any]:
    """The stored report of a resumed run, or an empty one."""
    p = report_path(cfg)
    if cfg.resume and p.is_file():
        return json.loads(p.read_text())
    return {"stages": {}}


def drop_stages(cfg: RecipeConfig, stages: list[str]) -> None:
    """Remove ``stages`` from the stored report: their entries, timings and the comparisons that involve them."""
    p = report_path(cfg)
    if not p.is_file():
        return
    report = json.loads(p.read_text())
    for s in stages:
        report.get("stages", {}).pop(s, None)
        for key in [k for k in report.get("seconds", {}) if k in (s, f"eval_{s}")]:
            report["seconds"].pop(key)
        for key in [k for k in report.get("comparisons", {}) if s in k.split("_vs_")]:
            report["comparisons"].pop(key)
    write_json_atomic(p, report)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, flush it to disk, then move it into place (never half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON as :func:`write_text_atomic` does."""
    write_text_atomic(path, json.dumps(data, indent=2))


def eval_flags(cfg: RecipeConfig, stage: str) -> tuple[list[bool], list[bool]] | None:
    """Per-problem (correct, looped) flags of a stage's evaluation, or None if it has none."""
    path = Path(cfg.output_dir) / "eval" / f"{stage}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [bool(r["correct"]) for r in rows], [float(r.get("loop_fraction", 0.0)) > 0 for r in rows]


def compare_stages(cfg: RecipeConfig, report: dict[str, Any]) -> None:
    """Paired McNemar tests of each evaluated stage against the one before it (``report["comparisons"]``).

    Each entry is the accuracy test (``delta``, ``n01`` fixed, ``n10`` broken, ``p_value``) with the same
    test on the loop indicator under ``"loop_rate"`` (``delta`` = change in loop rate, ``n01`` problems
    that started looping, ``n10`` problems that stopped).
    """
    names = [s for s in report["stages"] if "accuracy" in report["stages"][s]]
    comps = report.setdefault("comparisons", {})
    for prev, cur in itertools.pairwise(names):
        a, b = eval_flags(cfg, prev), eval_flags(cfg, cur)
        if a is not None and b is not None and len(a[0]) == len(b[0]):
            comps[f"{cur}_vs_{prev}"] = {**mcnemar_exact(a[0], b[0]), "loop_rate": mcnemar_exact(a[1], b[1])}


def format_table(report: dict[str, Any]) -> str:
    """The per-stage results (and paired comparisons) as a text table."""
    lines = [f"{'stage':<10} {'accuracy':>9} {'mean_len':>9} {'loop_rate':>10} {'problems':>9} {'nfe':>7}"]
    for name, r in report["stages"].items():
        if "accuracy" not in r:
            continue
        lines.append(f"{name:<10} {100 * r['accuracy']:>8.1f}% {r['mean_completion_length']:>9.1f} "
                     f"{100 * r.get('loop_rate', 0.0):>9.1f}% {r['num_problems']:>9d} {r.get('nfe', 0):>7d}")
    for key, c in report.get("comparisons", {}).items():
        lines.append(f"{key}: {100 * c['delta']:+.1f} points, McNemar p = {c['p_value']:.3g} "
                     f"(fixed {c['n01']}, broke {c['n10']})")
        loops = c.get("loop_rate")
        if loops and (loops["n01"] or loops["n10"]):
            lines.append(f"{key} loop rate: {100 * loops['delta']:+.1f} points, McNemar p = {loops['p_value']:.3g} "
                         f"(stopped looping {loops['n10']}, started {loops['n01']})")
    return "\n".join(lines)


def print_table(report: dict[str, Any]) -> str:
    """Print :func:`format_table` of ``report`` (and return it)."""
    text = format_table(report)
    print(text)
    return text


# ------------------------------------------------------------------------------------------------ report.md
#: the Markdown report written beside ``report.json``.
REPORT_MD = "report.md"


def _proportion_interval(rate: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a stored rate over ``n`` problems (the count recovered by rounding)."""
    from align.evaluate import wilson_interval

    return wilson_interval(round(rate * n), n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _stage_order(report: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(evaluated stages, trained stages)`` of a report, in the order the run ran them."""
    trained = [s for s in report.get("recipe", {}).get("stages", []) if isinstance(s, str)]
    trained += [s for s in report.get("stages", {}) if s != "base" and s not in trained]
    evaluated = [s for s in ["base", *trained] if "accuracy" in report.get("stages", {}).get(s, {})]
    return evaluated, trained


def evaluation_rows(report: dict[str, Any]) -> list[tuple[str, float, tuple[float, float], float, tuple[float, float]]]:
    """Per evaluated stage: ``(name, accuracy, 95% interval, loop rate, 95% interval)``."""
    rows = []
    for name in _stage_order(report)[0]:
        r = report["stages"][name]
        n, acc, loops = int(r.get("num_problems", 0)), float(r["accuracy"]), float(r.get("loop_rate", 0.0))
        rows.append((name, acc, _proportion_interval(acc, n), loops, _proportion_interval(loops, n)))
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _results_table(report: dict[str, Any]) -> list[str]:
    timings = report.get("seconds", {})
    lines = ["| stage | accuracy (95% interval) | loop rate (95% interval) | mean length | problems | nfe "
             "| training time | evaluation time |",
             "|---|---|---|---|---|---|---|---|"]
    evaluated, trained = _stage_order(report)
    for name in dict.fromkeys(["base", *trained]):
        r = report.get("stages", {}).get(name)
        if r is None:
            continue
        train_time = _duration(timings.get(name)) if name != "base" else "–"
        eval_time = _duration(timings.get(f"eval_{name}"))
        if name not in evaluated:
            lines.append(f"| {name} | – | – | – | – | – | {train_time} | {eval_time} |")
            continue
        n = int(r.get("num_problems", 0))
        acc, loops = float(r["accuracy"]), float(r.get("loop_rate", 0.0))
        (a_lo, a_hi), (l_lo, l_hi) = _proportion_interval(acc, n), _proportion_interval(loops, n)
        lines.append(f"| {name} | {_pct(acc)} ({_pct(a_lo)}–{_pct(a_hi)}) | {_pct(loops)} ({_pct(l_lo)}–{_pct(l_hi)}) "
                     f"| {float(r.get('mean_completion_length', 0.0)):.1f} | {n} | {r.get('nfe', '–')} "
                     f"| {train_time} | {eval_time} |")
    return lines


def _comparisons_table(report: dict[str, Any]) -> list[str]:
    comps = report.get("comparisons", {})
    if not comps:
        return ["No paired comparison (fewer than two stages evaluated on the same problems)."]
    lines = ["Exact McNemar tests on the same problems, each stage against the one before it. Accuracy: *fixed* "
             "problems were wrong before and right after, *broke* the reverse. Loop rate: the same test on whether "
             "a completion loops.", "",
             "| comparison | accuracy change | p | fixed | broke | loop rate change | p | started looping "
             "| stopped looping |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, c in comps.items():
        loops = c.get("loop_rate") or {}
        loop_cells = (f"{100 * loops['delta']:+.1f} points | {loops['p_value']:.3g} | {loops['n01']} | {loops['n10']}"
                      if loops else "– | – | – | –")
        lines.append(f"| {key.replace('_vs_', ' vs ')} | {100 * c['delta']:+.1f} points | {c['p_value']:.3g} "
                     f"| {c['n01']} | {c['n10']} | {loop_cells} |")
    return lines


def _images(plots: list[Any]) -> list[str]:
    """Markdown lines of ``plots``: one image per paragraph."""
    return [line for p in plots for line in (f"![{p.title}]({p.path})", "")]


def format_markdown(report: dict[str, Any], plots: dict[str, list[Any]], histories: dict[str, list[Any] | None],
                    recipe_text: str, title: str) -> str:
    """The text of ``report.md``: results table, paired comparisons, plots (links into ``plots/``), the recipe.

    Args:
        report: the run's ``report.json``.
        plots: the figures by section (:func:`align.pipeline.plots.draw_run_plots`).
        histories: each trained stage's log history, None where the stage kept none.
        recipe_text: the recipe as run (YAML).
        title: the run's name.
    """
    out = [f"# Run report: {title}", "",
           "Built from the run directory's `report.json`, `recipe.yaml` and each stage's `log_history.json`; "
           "rebuild it with `dlm-align report <run directory>`.", "",
           "## Results", "",
           "Accuracy and loop rate of each stage's evaluation on the held-out problems, with 95% Wilson "
           "intervals; mean completion length in tokens; nfe: model calls per completion.", "",
           *_results_table(report), "", "## Paired comparisons", "", *_comparisons_table(report), "", "## Plots", ""]
    if "eval" in plots:
        out += ["### Evaluation", "", *_images(plots["eval"])]
    for stage, history in histories.items():
        out += [f"### {stage}", ""]
        if history is None:
            out += [f"No training log: `{stage}/log_history.json` is missing.", ""]
        elif stage not in plots:
            out += ["No plotted metric in this stage's training log.", ""]
        else:
            out += _images(plots[stage])
    out += ["## Recipe", "", "<details>", "<summary>The recipe as run (<code>recipe.yaml</code>)</summary>", "",
            "```yaml", recipe_text.rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(out)


def write_report_md(run_dir: str | Path) -> Path:
    """(Re)build ``<run_dir>/report.md`` and its plots (``<run_dir>/plots/``) from the files of a run.

    Reads ``report.json``, ``recipe.yaml`` (else the recipe stored in the report) and each trained stage's
    ``log_history.json``; draws the figures of :mod:`align.pipeline.plots`. Returns the path of ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``report.json``.
        ValueError: a file of the run is not valid JSON (the message names it).
    """
    import yaml

    from align.pipeline.history import load_log_history
    from align.pipeline.plots import draw_run_plots

    run = Path(run_dir)
    if not (run / "report.json").is_file():
        raise FileNotFoundError(f"{run}: no report.json here (not a run directory, or no stage has finished yet)")
    report = _read_json(run / "report.json")
    if not isinstance(report, dict) or not isinstance(report.get("stages"), dict):
        raise ValueError(f"{run / 'report.json'}: expected an object with a 'stages' object")
    _, trained = _stage_order(report)
    histories = {stage: load_log_history(run / stage) for stage in trained}
    plots = draw_run_plots(run, histories, evaluation_rows(report))
    recipe_file = run / "recipe.yaml"
    recipe_text = (recipe_file.read_text() if recipe_file.is_file()
                   else yaml.safe_dump(report.get("recipe", {}), sort_keys=False))
    title = report.get("recipe", {}).get("run_name") or run.resolve().name
    path = run / REPORT_MD
    write_text_atomic(path, format_markdown(report, plots, histories, recipe_text, title))
    return path
