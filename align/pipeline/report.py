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
