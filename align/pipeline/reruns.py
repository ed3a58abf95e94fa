"""Honest re-runs: a run directory's results are reused only by the recipe that produced them.

Running a recipe into a directory that already holds results compares the new recipe with the stored one
(``recipe.yaml``, else the copy in ``report.json``) before anything is written. Each result depends on these keys
(dotted, as in overrides):

* every result: ``seed``, ``model.*``, ``data.*``, ``peft.*`` and ``eval.*`` (the report holds each stage's
  evaluation next to its weights);
* a training stage: also its own section and the sections of the stages before it, and ``stages`` up to it;
* the base evaluation (``report.json`` ``stages.base``): nothing more.

Keys that do not change what a stage computes are left out: ``output_dir``, ``resume``, ``run_name``,
``report_to``, and in a stage's section :data:`NOT_RESULTS` (logging and checkpoint cadence).

A stage holds results when its ``final`` exists, it has a complete checkpoint, or the report has its entry. When
any key a stage with results depends on differs, :func:`plan_rerun` raises :class:`RerunConflict` naming each
key (old -> new) and the ways out. ``--restart`` / ``--restart-from STAGE`` (:func:`restart_paths`) delete the
results a new run replaces.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.config import STAGES, RecipeConfig, config_to_dict
from align.options import ConfigError
from align.pipeline.report import drop_stages
from align.trainers.checkpoints import last_complete_checkpoint

logger = logging.getLogger(__name__)

#: keys of a stage's section that change neither its weights nor its evaluation.
NOT_RESULTS = ("logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "save_steps",
               "save_strategy", "save_total_limit", "disable_tqdm", "report_to", "run_name")
#: sections every result depends on.
SHARED = ("seed", "model", "data", "peft", "eval")
#: shown for a key that one of the two recipes does not have.
ABSENT = "<absent>"


class RerunConflict(ConfigError):
    """The run directory holds results of a recipe that differs in keys those results depend on."""


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for each value that differs, descending where both sides are dicts (a key on
    one side only shows :data:`ABSENT` on the other; a section that is a dict on one side only is one entry)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += diff(old.get(k, ABSENT), new.get(k, ABSENT), key)
        return out
    return [] if old == new else [(prefix, old, new)]


def stored_recipe(output_dir: str | Path) -> dict[str, Any] | None:
    """The recipe a run directory was run with: ``recipe.yaml``, else the report's copy; None when neither."""
    out = Path(output_dir)
    if (out / "recipe.yaml").is_file():
        return yaml.safe_load((out / "recipe.yaml").read_text()) or {}
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text()).get("recipe")
    return None


def _depends_on(key: str, stage: str | None, stages: list[str]) -> bool:
    """Whether the result of ``stage`` (None: the base evaluation) depends on ``key``."""
    head, _, rest = key.partition(".")
    if head in SHARED:
        return True
    if stage is None or head not in stages[: stages.index(stage) + 1]:
        return False
    return rest.split(".")[0] not in NOT_RESULTS


def changed_keys(old: dict[str, Any], new: dict[str, Any], stage: str | None) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each key the result of ``stage`` (None: base evaluation) depends on that differs."""
    new_stages = list(new.get("stages") or [])
    changes = []
    if stage is not None:
        k = new_stages.index(stage) + 1
        if list(old.get("stages") or [])[:k] != new_stages[:k]:
            changes.append(("stages", old.get("stages"), new.get("stages")))
    rest = diff({k: v for k, v in old.items() if k != "stages"}, {k: v for k, v in new.items() if k != "stages"})
    return changes + [c for c in rest if _depends_on(c[0], stage, new_stages)]


def _stage_state(out: Path, stage: str, report: dict[str, Any]) -> str | None:
    """``finished``, ``partly trained`` or None (no results) for ``stage`` in run directory ``out``."""
    final = out / stage / "final"
    if stage in report.get("stages", {}) and final.is_dir():
        return "finished"
    if final.is_dir() or last_complete_checkpoint(out / stage) or stage in report.get("stages", {}):
        return "partly trained"
    return None


@dataclass
class RerunPlan:
    """What ``--restart`` / ``--restart-from`` deletes before a run (``remove``: paths; ``drop``: report entries,
    ``["*"]`` for the whole report)."""

    remove: list[Path] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)


def restart_paths(cfg: RecipeConfig, restart_from: str | None, everything: bool) -> tuple[list[Path], list[str]]:
    """Paths (and report entries) a restart deletes: with ``everything`` the whole run's results (never other
    files of ``output_dir``), else ``restart_from``'s stage and every stage after it, with their evaluations."""
    out = Path(cfg.output_dir)
    if everything:
        names = ["recipe.yaml", "report.json", "report.json.tmp", "report.md", "plots", "eval", *STAGES]
        return [out / n for n in names if (out / n).exists()], ["*"]
    stages = cfg.stages[cfg.stages.index(restart_from):] if restart_from else []
    # report.md and its plots describe every stage: the run writes them again when it ends
    paths = [p for s in stages for p in (out / s, out / "eval" / f"{s}.jsonl") if p.exists()]
    paths += [out / n for n in ("report.md", "plots") if stages and (out / n).exists()]
    return paths, stages


def plan_rerun(cfg: RecipeConfig, *, restart: bool = False, restart_from: str | None = None) -> RerunPlan:
    """Compare ``cfg`` with the recipe stored in its run directory, before anything is written.

    Raises :class:`RerunConflict` when a result the run would keep (a finished stage, a partly trained one, the
    base evaluation) depends on a key that changed; ``restart`` / ``restart_from`` first set aside what they
    would delete. Nothing is changed on disk here.
    """
    if restart_from is not None and restart_from not in cfg.stages:
        raise ConfigError(f"--restart-from {restart_from}: not a stage of this recipe ({', '.join(cfg.stages)})")
    out = Path(cfg.output_dir)
    remove, drop = restart_paths(cfg, restart_from, restart) if (restart or restart_from) else ([], [])
    plan = RerunPlan(remove=remove, drop=drop)
    if restart:
        return plan
    old = stored_recipe(out)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    states = {s: st for s in cfg.stages if s not in drop and (st := _stage_state(out, s, report)) is not None}
    if old is None:
        if states:
            logger.warning("%s holds results of stages %s but no recipe.yaml to compare with; reusing them",
                           out, ", ".join(states))
        return plan
    new = config_to_dict(cfg)
    conflicts: list[tuple[str, str, list[tuple[str, Any, Any]]]] = []
    base_kept = "base" in report.get("stages", {}) and cfg.eval.enabled and cfg.eval.base
    if base_kept and (changes := changed_keys(old, new, None)):
        conflicts.append(("base", "evaluated", changes))
    for stage, state in states.items():
        if changes := changed_keys(old, new, stage):
            conflicts.append((stage, state, changes))
    if conflicts:
        raise RerunConflict(_conflict_message(out, conflicts, cfg.stages))
    return plan


def _show(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value, default=str)


def _conflict_message(out: Path, conflicts: list[tuple[str, str, list[tuple[str, Any, Any]]]],
                      stages: list[str]) -> str:
    keys: dict[str, tuple[Any, Any]] = {}
    for _, _, changes in conflicts:
        keys.update({k: (a, b) for k, a, b in changes})
    lines = [f"{out} holds results of another recipe; nothing was run or changed. These keys differ from the "
             "recipe stored there:"]
    lines += [f"  {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in keys.items()]
    lines.append("results that depend on them: " + ", ".join(f"{s} ({state})" for s, state, _ in conflicts))
    first = next((s for s in stages if any(c[0] == s for c in conflicts)), None)
    ways = ["pass a new output_dir=... to keep both runs", "add --restart to delete this run's results and run "
            "every stage again"]
    if first is not None and all(c[0] != "base" for c in conflicts):
        ways.append(f"add --restart-from {first} to keep the stages before {first} and run {first} and the "
                    "stages after it again")
    return "\n".join([*lines, "ways out: " + "; or ".join(ways)])


def apply_restart(plan: RerunPlan, cfg: RecipeConfig) -> None:
    """Delete what ``plan`` says a restart replaces (call it on the main rank, after the inputs were checked)."""
    for path in plan.remove:
        logger.warning("restart: deleting %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if plan.drop and plan.drop != ["*"]:
        drop_stages(cfg, plan.drop)

