"""Whole weights for the length of a rollout under ZeRO-3 and FSDP2.

A rollout runs hundreds of forward passes (every denoising step of every block, then the old and reference
scores). Under DeepSpeed ZeRO-3 and FSDP2 each rank holds only a shard of each weight, and every forward pass
of a sharded module gathers its weights and frees them again: per layer, per step. That is slow, and it ties
the ranks together: every rank must run the same number of forward passes, while the sampler stops early when
its rows are finished (``eos_policy: stop``, threshold decoding) and the loop guard adds steps, so ranks
would wait on each other or hang.

:func:`whole_weights` gathers every weight once, lets the forward passes run locally on the rank's own data,
and shards the weights again at the end:

* ZeRO-3: ``deepspeed.zero.GatheredParameters`` over all parameters, with the engine's per-module fetch and
  release hooks detached meanwhile (they would free the gathered weights after each module) and registered
  again afterwards;
* FSDP2 (``fully_shard``): every FSDP module unsharded, with resharding after forward switched off, then
  resharded and its setting restored;
* anything else (one process, DDP, ZeRO-1/2, whose ranks hold whole weights): nothing to do.

The gathered weights cost one full copy of the model per rank for the length of the rollout (``docs/distributed.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)


def zero3_engine(wrapped: Any) -> Any | None:
    """The DeepSpeed engine of ``wrapped`` when it runs ZeRO stage 3, else None."""
    stage = getattr(wrapped, "zero_optimization_stage", None)
    if not callable(stage) or stage() != 3:
        return None
    return wrapped


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` sharded by FSDP2's ``fully_shard`` (outermost first); empty when none is."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def _zero3_gathered(engine: Any) -> Iterator[None]:
    import deepspeed

    module = engine.module
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        hooks = [] if offload is None else list(offload.forward_hooks) + list(offload.backward_hooks)
        for p in module.parameters():                 # no module holds them: the release hook would free them
            getattr(p, "ds_active_sub_modules", set()).clear()
        for h in hooks:
            h.remove()
        try:
            yield
        finally:
            if offload is not None:
                offload.forward_hooks, offload.backward_hooks = [], []
                coordinator = getattr(offload, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()   # the recorded fetch order saw the rollout, not a step
                offload._register_deepspeed_module(offload.module)


@contextmanager
def _fsdp2_unsharded(modules: list[torch.nn.Module]) -> Iterator[None]:
    # the sampler calls the blocks, not the root's forward: set up the root's FSDP state first (it would otherwise
    # be set up by the first block called, which then claims to be a root, and the root's forward fails later)
    modules[0]._get_fsdp_state()._lazy_init()
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for g, info in zip(groups, saved, strict=True):
            g.post_forward_mesh_info = info
        for m in reversed(modules):
            m.reshard()


@contextmanager
def whole_weights(wrapped: Any, model: torch.nn.Module) -> Iterator[None]:
    """Gather ``model``'s sharded weights once for the body of the ``with`` (see the module docstring).

    Args:
        wrapped: the trainer's wrapped model (``Trainer.model_wrapped``: the DeepSpeed engine under DeepSpeed).
        model: the module the body runs (``Trainer.model``).
    """
    engine = zero3_engine(wrapped)
    if engine is not None:
        with _zero3_gathered(engine):
            yield
        return
    modules = fsdp2_modules(model)
    if modules:
        with _fsdp2_unsharded(modules):
            yield
        return
    yield
