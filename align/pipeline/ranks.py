"""What a stage ran on across processes, and a check that every rank ends it with the same weights.

:func:`parallel_layout` names the back-end a trainer ran under (one process, DDP, DeepSpeed ZeRO-n, FSDP1/2);
the run report records it per stage. :func:`weights_digest` hashes a model's weights; :func:`agreed_digest`
compares the digests of all ranks and stops the run, naming the ranks, when they differ: data-parallel ranks
that drift apart (a gradient left out of the all-reduce, a rank-dependent update) would otherwise train on
silently, and every later stage and evaluation would depend on which rank's copy was saved.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)


class RanksDisagree(RuntimeError):
    """The ranks of a run ended a stage with different weights."""


def parallel_layout(trainer: Any) -> dict[str, Any]:
    """``{"processes": N, "backend": ...}`` of a trainer (known once it is built): ``single``, ``ddp``,
    ``zero<n>``, ``fsdp1`` or ``fsdp2``.

    accelerate runs FSDP only on accelerators: on a CPU-only machine its state ignores an FSDP config
    (``ACCELERATE_USE_FSDP``) and the processes run DDP. That is logged as a warning, and the layout says ``ddp``.
    """
    n = int(trainer.args.world_size)
    state = trainer.accelerator.state
    if getattr(trainer, "is_deepspeed_enabled", False):
        backend = f"zero{state.deepspeed_plugin.zero_stage}"
    elif getattr(trainer, "is_fsdp_enabled", False):
        backend = f"fsdp{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    else:
        backend = "ddp" if n > 1 else "single"
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            logger.warning("accelerate's config asks for FSDP, but accelerate runs FSDP only on GPUs (and other "
                           "accelerators): these %d process(es) run %s", n, backend.upper())
    return {"processes": n, "backend": backend}


def is_sharded(layout: dict[str, Any]) -> bool:
    """Whether each rank held only a shard of the weights (ZeRO-3, FSDP)."""
    return layout["backend"] in ("zero3", "fsdp1", "fsdp2")


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (names, dtypes, shapes and bytes, in ``state_dict``
    order); 16 hex digits."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not torch.is_tensor(t):
            continue
        x = t.detach().cpu().contiguous()
        h.update(f"{name}:{x.dtype}:{tuple(x.shape)};".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()[:16]


def agreed_digest(model: torch.nn.Module, stage: str) -> str:
    """The :func:`weights_digest` of ``model``, after checking that every rank of the process group has the same
    one (a single process just returns it). Raises :class:`RanksDisagree` naming the ranks that differ from
    rank 0."""
    digest = weights_digest(model)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return digest
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, digest)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise RanksDisagree(f"stage {stage}: ranks {odd} ended with weights different from rank 0's (digests "
                            f"{', '.join(f'{r}: {d}' for r, d in enumerate(every))}); the data-parallel copies drifted "
                            "apart, so the run stops instead of saving one rank's copy")
    return digest
