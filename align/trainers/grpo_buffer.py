"""Reusing one batch of rollouts for the ``μ = num_iterations`` inner iterations of diffusion GRPO.

TRL's scheme (its ``RepeatSampler`` and ``_prepare_inputs``): the data loader yields the prompts of each
optimizer step ``μ`` times in a row (:class:`RepeatedWindowSampler`); the trainer samples rollouts on the first
pass and reuses them on the other ``μ − 1``, so every prompt the loader yields is trained on, ``μ`` times, and
none is drawn and then dropped. Rollouts buffered inside a cycle are saved with the checkpoint
(:func:`save_rollouts`), so a run resumed from a checkpoint taken between two inner iterations continues with
the same rollouts, as if it had not stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

#: file holding one process's buffered rollouts inside a checkpoint directory.
ROLLOUTS_FILE = "grpo_rollouts-rank{rank}.pt"


class RepeatedWindowSampler(Sampler[int]):
    """Row indices in windows of ``window`` rows, each window yielded ``repeats`` times in a row.

    A window is what one optimizer step consumes over all processes (prompts per micro-batch × accumulation
    steps × processes); with the data loader's batch size equal to the prompts per micro-batch, the ``k``-th
    pass over a window gives every process the same micro-batches as the first. The order is a permutation
    seeded by ``seed + epoch`` (as ``accelerate``'s seedable sampler), the same on every process; a last window
    with fewer than ``window`` rows is left out (TRL's ``RepeatSampler`` does the same).

    Args:
        num_rows: rows in the dataset.
        window: rows per window (> 0).
        repeats: passes over each window (``μ``).
        seed: base seed of the permutation.
        shuffle: permute the rows (else dataset order).
    """

    def __init__(self, num_rows: int, window: int, repeats: int, *, seed: int, shuffle: bool = True) -> None:
        if window < 1 or repeats < 1:
            raise ValueError(f"window and repeats must be >= 1, got {window} and {repeats}")
        self.num_rows, self.window, self.repeats = int(num_rows), int(window), int(repeats)
        self.seed, self.shuffle, self.epoch = int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by the Trainer before each epoch)."""
        self.epoch = int(epoch)

    @property
    def num_windows(self) -> int:
        """Whole windows per epoch."""
        return self.num_rows // self.window

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        for w in range(self.num_windows):
            chunk = order[w * self.window:(w + 1) * self.window]
            for _ in range(self.repeats):
                yield from chunk
        self.epoch += 1

    def __len__(self) -> int:
        return self.num_windows * self.window * self.repeats


def repeated_window_sampler(num_rows: int, window: int, repeats: int, *, seed: int, strategy: str = "random"
                            ) -> RepeatedWindowSampler:
    """The sampler of a run with ``num_iterations = repeats > 1``, after checking that it can be built.

    ``strategy`` is the ``train_sampling_strategy`` training argument: ``random`` or ``sequential``.

    Raises:
        ValueError: another strategy, or fewer rows than one window.
    """
    if strategy not in ("random", "sequential"):
        raise ValueError(f"'grpo.train_sampling_strategy' {strategy!r} cannot be combined with "
                         f"'grpo.num_iterations' {repeats} > 1: use 'random' or 'sequential'")
    if num_rows < window:
        raise ValueError(f"the training set has {num_rows} prompts, fewer than one optimizer step uses ({window}); "
                         "lower 'grpo.per_device_train_batch_size' or 'grpo.gradient_accumulation_steps', or add "
                         "prompts")
    if num_rows % window:
        logger.info("num_iterations=%d: each epoch uses %d of the %d prompts (whole optimizer steps of %d prompts)",
                    repeats, num_rows // window * window, num_rows, window)
    return RepeatedWindowSampler(num_rows, window, repeats, seed=seed, shuffle=strategy == "random")


def save_rollouts(checkpoint_dir: str | Path, rank: int, state: dict[str, Any]) -> Path:
    """Write one process's buffered rollouts (``state``) into ``checkpoint_dir``; return the file."""
    path = Path(checkpoint_dir) / ROLLOUTS_FILE.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_rollouts(checkpoint_dir: str | Path, rank: int, device: torch.device | str = "cpu"
                  ) -> dict[str, Any] | None:
    """The state saved by :func:`save_rollouts` in ``checkpoint_dir`` (tensors on ``device``), or None."""
    path = Path(checkpoint_dir) / ROLLOUTS_FILE.format(rank=rank)
    if not path.is_file():
        return None
    # the file is written by this trainer into the run's own checkpoint (dataclasses of tensors)
    return torch.load(path, map_location=device, weights_only=False)
