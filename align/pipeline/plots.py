"""PNG plots of a run (``<output_dir>/plots/``): each stage's training curves and the evaluation per stage.

The curves come from each stage's ``log_history.json`` (:mod:`align.pipeline.history`): one figure per stage and
per entry of :data:`CURVES` whose metrics that stage logged (``<stage>_<name>.png``); a metric never logged gives no
figure. ``eval.png`` shows accuracy and loop rate per evaluated stage with their 95% intervals. matplotlib is
imported here only, when a figure is drawn, and draws off screen (its Agg canvas; no display is needed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the folder, inside the run directory, that holds the plots.
PLOTS_DIR = "plots"


def _exact(*keys: str) -> Callable[[Iterable[str]], list[str]]:
    return lambda logged: [k for k in keys if k in set(logged)]


def _matching(pattern: str) -> Callable[[Iterable[str]], list[str]]:
    rx = re.compile(pattern)
    return lambda logged: sorted(k for k in set(logged) if rx.fullmatch(k))


@dataclass(frozen=True)
class Curve:
    """One kind of training figure: the logged metrics it draws (each a line against the step).

    Attributes:
        name: the file name's suffix (``<stage>_<name>.png``).
        title: the figure's title (after the stage name).
        ylabel: the label of its y axis.
        select: the metrics drawn, chosen from the names a stage logged.
        label: the legend entry of a metric.
    """

    name: str
    title: str
    ylabel: str
    select: Callable[[Iterable[str]], list[str]]
    label: Callable[[str], str] = lambda key: key


#: the training figures, in the order the report shows them. Metric names as the trainers log them: ``loss``
#: (every trainer); GRPO's ``rewards/<function>/mean``, ``kl``, ``clip_ratio/*``, ``completions/mean_length`` and
#: ``rollout/tokens_per_second`` (``align/trainers/grpo_metrics.py``, ``grpo.py``); VRPO's ``rewards/accuracies`` and
#: ``rewards/margins``, with their held-out values ``eval_rewards/*`` when ``vrpo.eval_pairs`` is set.
CURVES: tuple[Curve, ...] = (
    Curve("loss", "training loss", "loss", _exact("loss")),
    Curve("rewards", "reward per function (mean over the completions)", "reward", _matching(r"rewards/.+/mean"),
          lambda key: key.split("/")[1]),
    Curve("kl", "KL to the reference policy", "KL", _exact("kl")),
    Curve("clip_ratio", "clipped share of the probability ratio", "share", _matching(r"clip_ratio/.+"),
          lambda key: key.split("/", 1)[1]),
    Curve("completion_length", "mean completion length", "tokens", _exact("completions/mean_length")),
    Curve("rollout_tokens_per_second", "rollout throughput", "tokens / s", _exact("rollout/tokens_per_second")),
    Curve("preference_accuracy", "chosen scored above rejected", "share of pairs",
          _exact("rewards/accuracies", "eval_rewards/accuracies"),
          lambda key: "held-out" if key.startswith("eval_") else "training"),
    Curve("preference_margin", "reward margin (chosen - rejected)", "margin",
          _exact("rewards/margins", "eval_rewards/margins"),
          lambda key: "held-out" if key.startswith("eval_") else "training"),
)


@dataclass(frozen=True)
class Plot:
    """A figure written to disk: its file (relative to the run directory) and its title."""

    path: str
    title: str


def series(history: list[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` in a log history: the entries that hold a finite number for it."""
    steps, values = [], []
    for entry in history:
        value, step = entry.get(key), entry.get("step")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if not isinstance(step, (int, float)):
            continue
        steps.append(float(step))
        values.append(float(value))
    return steps, values


def curves_of(history: list[Mapping[str, Any]]) -> list[tuple[Curve, dict[str, tuple[list[float], list[float]]]]]:
    """The figures a stage's log history fills: each :class:`Curve` with the series of its metrics that hold at least
    one finite value (a figure none of whose metrics was logged is left out)."""
    logged = {k for entry in history for k in entry}
    out = []
    for curve in CURVES:
        found = {key: series(history, key) for key in curve.select(logged)}
        found = {k: v for k, v in found.items() if v[0]}
        if found:
            out.append((curve, found))
    return out


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols if ncols > 1 else 6.4, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})


def draw_curve(stage: str, curve: Curve, found: Mapping[str, tuple[list[float], list[float]]], path: Path) -> None:
    """Draw one training figure of ``stage`` to ``path``."""
    fig, (ax,) = _figure()
    for key, (steps, values) in found.items():
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2,
                label=curve.label(key))
    ax.set_title(f"{stage}: {curve.title}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(curve.ylabel)
    ax.grid(alpha=0.3)
    if len(found) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)


def draw_evaluation(rows: list[tuple[str, float, tuple[float, float], float, tuple[float, float]]],
                    path: Path) -> None:
    """Bar charts of accuracy and loop rate per stage (in percent) with their 95% intervals as error bars.

    Args:
        rows: per stage ``(name, accuracy, (low, high), loop_rate, (low, high))``, proportions in [0, 1].
        path: the PNG to write.
    """
    fig, axes = _figure(2)
    names = [r[0] for r in rows]
    for ax, value_at, title, color in ((axes[0], 1, "accuracy", "tab:blue"), (axes[1], 3, "loop rate", "tab:orange")):
        values = [100 * r[value_at] for r in rows]
        low = [max(0.0, 100 * (r[value_at] - r[value_at + 1][0])) for r in rows]
        high = [max(0.0, 100 * (r[value_at + 1][1] - r[value_at])) for r in rows]
        ax.bar([f"{n}\n{v:.1f}%" for n, v in zip(names, values, strict=True)], values, yerr=[low, high],
               capsize=4, color=color, alpha=0.8)
        ax.set_title(f"{title} per stage (95% interval)", fontsize=10)
        ax.set_ylabel("%")
        ax.set_ylim(0, max(5.0, *(100 * r[value_at + 1][1] for r in rows)) * 1.15)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def draw_run_plots(run_dir: str | Path, histories: Mapping[str, list[Mapping[str, Any]] | None],
                   evaluation: list[tuple[str, float, tuple[float, float], float, tuple[float, float]]]
                   ) -> dict[str, list[Plot]]:
    """Draw every figure of a run into ``<run_dir>/plots/`` and return them by section (``"eval"``, then each stage).

    PNG files in that folder that this call did not write (left from an earlier report) are deleted.

    Args:
        run_dir: the run directory.
        histories: each trained stage's log history (None where the stage has none), in stage order.
        evaluation: the rows of :func:`draw_evaluation` (no ``eval.png`` when empty).
    """
    folder = Path(run_dir) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[Plot]] = {}
    if evaluation:
        draw_evaluation(evaluation, folder / "eval.png")
        plots["eval"] = [Plot(f"{PLOTS_DIR}/eval.png", "accuracy and loop rate per stage")]
    for stage, history in histories.items():
        for curve, found in curves_of(history or []):
            name = f"{stage}_{curve.name}.png"
            draw_curve(stage, curve, found, folder / name)
            plots.setdefault(stage, []).append(Plot(f"{PLOTS_DIR}/{name}", f"{stage}: {curve.title}"))
    written = {Path(p.path).name for group in plots.values() for p in group}
    for old in folder.glob("*.png"):
        if old.name not in written:
            old.unlink()
    return plots
