"""Running recipes, split by job.

* :mod:`align.pipeline.recipe` — :func:`run_recipe`: model, data, stages in order, evaluation after each.
* :mod:`align.pipeline.stage` — :func:`run_stage`: one training stage (its ``TrainingArguments``, trainer and
  final save).
* :mod:`align.pipeline.report` — the run report: per-stage results, paired tests, the printed table.
* :mod:`align.pipeline.reruns` — honest re-runs: which recipe keys each stored result depends on, ``--restart``.
"""

from align.pipeline.recipe import load_splits, run_eval, run_recipe
from align.pipeline.report import compare_stages, format_table, print_table
from align.pipeline.stage import run_stage, training_arguments

__all__ = [
    "compare_stages",
    "format_table",
    "load_splits",
    "print_table",
    "run_eval",
    "run_recipe",
    "run_stage",
    "training_arguments",
]
