"""``dlm-align report RUN_DIR``: (re)build a run's ``report.md`` and its plots from the files of the run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_report(args: argparse.Namespace) -> int:
    from align.pipeline.report import write_report_md

    run = Path(args.run_dir)
    if not run.is_dir():
        print(f"error: {run}: no such directory", file=sys.stderr)
        return 2
    try:
        path = write_report_md(run)
    except ValueError as exc:                     # a file of the run that is not valid JSON, named in the message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plots = sorted((run / "plots").glob("*.png"))
    print(f"report: {path} ({len(plots)} plot{'s' if len(plots) != 1 else ''} in {run / 'plots'})")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``report`` subcommand."""
    p = sub.add_parser("report", help="(re)build a run's report.md and plots from its directory",
                       description="Write RUN_DIR/report.md (results table with 95%% intervals, paired comparisons, "
                       "plots, the recipe) and the PNG plots in RUN_DIR/plots/ from the run's report.json, "
                       "recipe.yaml and each stage's log_history.json. A finished run already has them; this "
                       "rebuilds them, e.g. for a run that was stopped or a run made before they existed.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (the folder that holds report.json)")
    p.set_defaults(func=_cmd_report)
