"""Crash-safe training checkpoints and a clean stop on SIGTERM, for every trainer of the package.

A checkpoint is written where no reader looks for one, then moved into place whole:

1. the ``Trainer`` writes ``<output_dir>/.staging/checkpoint-N`` (:class:`StagedCheckpoints` points its
   checkpoint directory there; weights, optimizer, scheduler, RNG states, trainer state, GRPO rollouts);
2. every rank waits for the others (barrier); the main rank flushes each file to disk (``fsync``), writes the
   ``.complete`` marker last, flushes it, and renames the folder to ``<output_dir>/checkpoint-N`` (one atomic
   ``rename`` on the same file system), then flushes the parent folder (:class:`CompleteMarker`);
3. a resumed run takes the newest ``checkpoint-N`` that holds the marker (:func:`last_complete_checkpoint`);
   :func:`resume_checkpoint` also names each torn checkpoint it skips and deletes the staging leftovers.

A process killed at any point therefore leaves either a complete checkpoint in place or none for that step.
:class:`StopOnSigterm` turns SIGTERM into "save a complete checkpoint at the next step boundary, then stop".
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

#: file written into a checkpoint (and a stage's ``final``) after everything else.
COMPLETE_MARKER = ".complete"
#: folder, inside a stage's output directory, where checkpoints are written before they are moved into place.
STAGING_DIR = ".staging"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under ``root`` and every folder (``root`` included) to disk."""
    root = Path(root)
    for path in [*sorted(root.rglob("*")), root]:
        if path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush one folder's entries (new, renamed or deleted names) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(folder: str | os.PathLike, text: str = "") -> None:
    """Write :data:`COMPLETE_MARKER` into ``folder`` and flush it (and the folder) to disk."""
    marker = Path(folder) / COMPLETE_MARKER
    with open(marker, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step ``N`` of a ``checkpoint-N`` folder name, or None for any other name."""
    name = Path(path).name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        return None
    return int(name[len(prefix):])


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that holds the ``.complete`` marker, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(step, p) for p in root.iterdir()
             if p.is_dir() and (step := checkpoint_step(p)) is not None and (p / COMPLETE_MARKER).is_file()]
    return str(max(found)[1]) if found else None


def torn_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of ``output_dir`` that were not fully written: everything left in the staging folder, and any
    ``checkpoint-N`` folder without the marker (oldest step first)."""
    root = Path(output_dir)
    staged = sorted((root / STAGING_DIR).iterdir()) if (root / STAGING_DIR).is_dir() else []
    unmarked = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None
                and not (p / COMPLETE_MARKER).is_file()] if root.is_dir() else []
    return sorted(staged + unmarked, key=lambda p: (checkpoint_step(p) or -1, str(p)))


def resume_checkpoint(output_dir: str | os.PathLike, *, clean: bool = True) -> str | None:
    """The newest complete checkpoint of ``output_dir`` (None if there is none), logging a warning that names each
    torn checkpoint skipped. With ``clean`` the staging leftovers are deleted (call it on the main rank only);
    a ``checkpoint-N`` folder without the marker is left where it is."""
    best = last_complete_checkpoint(output_dir)
    for torn in torn_checkpoints(output_dir):
        staged = torn.parent.name == STAGING_DIR
        why = ("being deleted" if torn.name.endswith(".old") else "never moved into place") if staged \
            else f"no {COMPLETE_MARKER} marker"
        logger.warning("skipping torn checkpoint %s (%s)%s", torn, why, "; deleting it" if staged and clean else "")
    if clean and (Path(output_dir) / STAGING_DIR).is_dir():
        shutil.rmtree(Path(output_dir) / STAGING_DIR)
    return best


def discard(folder: str | os.PathLike, trash: str | os.PathLike) -> None:
    """Delete ``folder`` after moving it into ``trash`` as ``<name>.old`` (one rename), so that a kill during the
    deletion leaves nothing half-deleted under its name."""
    target = Path(trash) / f"{Path(folder).name}.old"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(folder, target)
    shutil.rmtree(target)
    if not any(target.parent.iterdir()):
        target.parent.rmdir()


def drop_old_checkpoints(output_dir: str | os.PathLike, keep: int | None, best: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of ``output_dir`` (and ``best``, if given); return
    the ones deleted. Each is first moved out of place (into the staging folder, as ``checkpoint-N.old``), so a
    kill during the deletion never leaves a half-deleted checkpoint where a resume looks."""
    if not keep or keep <= 0:
        return []
    root = Path(output_dir)
    found = sorted((step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None
                   and (p / COMPLETE_MARKER).is_file())
    protect = {str(Path(best).resolve())} if best else set()
    old = [p for _, p in found[:-keep] if str(p.resolve()) not in protect]
    for p in old:
        discard(p, root / STAGING_DIR)
    return old


class StagedCheckpoints:
    """``Trainer`` mixin: checkpoints are written under ``<output_dir>/.staging``; :class:`CompleteMarker` moves
    each into place once it is complete. List it before ``Trainer`` among the bases."""

    def _get_output_dir(self, trial: Any) -> str:
        return str(Path(super()._get_output_dir(trial)) / STAGING_DIR)  # type: ignore[misc]


class CompleteMarker(TrainerCallback):
    """Finish each checkpoint once the trainer has saved it: barrier, flush, marker last, atomic move into place.

    A checkpoint the trainer wrote in place (a trainer without :class:`StagedCheckpoints`) gets its marker only.
    Checkpoints beyond ``save_total_limit`` are deleted after the move, the newest kept.
    """

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        _barrier()                                           # every rank has written its files
        if state.is_world_process_zero:
            name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            staged, final = Path(args.output_dir) / STAGING_DIR / name, Path(args.output_dir) / name
            if staged.is_dir():
                fsync_tree(staged)
                write_marker(staged, str(state.global_step))
                if final.exists():                            # a torn or older copy of the same step
                    discard(final, staged.parent)
                os.replace(staged, final)
                if not any(staged.parent.iterdir()):
                    staged.parent.rmdir()
                fsync_dir(final.parent)
                drop_old_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint)
            elif final.is_dir():
                fsync_tree(final)
                write_marker(final, str(state.global_step))
        _barrier()                                           # no rank runs ahead of the move


class TrainingStopped(RuntimeError):
    """Training stopped on SIGTERM after saving a complete checkpoint; running the same command resumes it."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped on SIGTERM after step {step} ({where}); run the same command again to resume")


class StopOnSigterm(TrainerCallback):
    """While training runs, SIGTERM asks for a checkpoint at the next step boundary and then a stop.

    The handler only sets a flag; at the end of the next optimizer step the trainer is told to save and to stop
    (under ``torch.distributed`` the flag is shared, so every rank stops at the same step). ``stopped_at`` is the
    step it stopped after (None when it was not asked to stop). The previous handler comes back when training ends.
    Outside the main thread no handler is installed (signals reach the main thread only).
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        asked = self.requested
        if _distributed():
            flag = torch.tensor(float(asked), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item() > 0)
        if asked:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the SIGTERM handler that was there before training back (safe to call more than once)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
