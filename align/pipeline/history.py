"""Each stage's training log kept as JSON (``<output_dir>/<stage>/log_history.json``), whatever ``report_to`` says.

:class:`LogHistoryWriter` is a ``TrainerCallback``: at every logging step, and when the stage ends, the main process
writes the Trainer's ``state.log_history`` (the list of logged dicts: ``loss``, ``grad_norm``, the trainer's own
metrics, each with its ``step``) to a temporary file and moves it into place, so an interrupted stage keeps its curve
up to its last logging step. A resumed stage starts from the history stored in its checkpoint (the Trainer restores
``state.log_history`` from it), so the file keeps the earlier part of the curve and drops the steps that are run again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.pipeline.report import write_text_atomic

#: the file, inside a stage's folder, that holds its training log.
LOG_HISTORY_FILE = "log_history.json"


def log_history_path(stage_dir: str | Path) -> Path:
    """Where the training log of the stage whose folder is ``stage_dir`` is kept."""
    return Path(stage_dir) / LOG_HISTORY_FILE


def _finite_or_none(value: Any) -> Any:
    """``value``, with a non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_log_history(stage_dir: str | Path, log_history: list[dict[str, Any]]) -> Path:
    """Write ``log_history`` to ``<stage_dir>/log_history.json`` atomically (non-finite values as null)."""
    path = log_history_path(stage_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: _finite_or_none(v) for k, v in entry.items()} for entry in log_history]
    write_text_atomic(path, json.dumps(rows, indent=1, default=str))
    return path


def load_log_history(stage_dir: str | Path) -> list[dict[str, Any]] | None:
    """The stored training log of a stage, or None when its folder has none.

    Raises:
        ValueError: the file is not a JSON list of objects (the message names the file).
    """
    path = log_history_path(stage_dir)
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of logged entries (objects)")
    return rows


class LogHistoryWriter(TrainerCallback):
    """Keep the Trainer's ``state.log_history`` in ``<stage_dir>/log_history.json`` (main process only): after each
    logging step, after each checkpoint and at the end of training."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.stage_dir = Path(stage_dir)

    def _write(self, state: Any) -> None:
        if state.is_world_process_zero:
            save_log_history(self.stage_dir, state.log_history)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the history after each logged entry."""
        self._write(state)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the history after each checkpoint."""
        self._write(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the history when training ends."""
        self._write(state)
