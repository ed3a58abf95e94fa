"""Selective log-softmax: ``log softmax(h·W^T)[target]`` at a set of positions, without a [B, T, V] tensor.

The likelihood estimators need ``log f_θ(y_i | z)_i`` only at the masked positions that count. Their
hidden states are gathered first (``[N, d]``), then one of two back-ends turns them into log-probabilities:

* :func:`head_log_probs` (default, any head): applies the model's output head to chunks of positions,
  reduces each chunk to ``logit[target] − logsumexp(logits)`` in fp32, and under autograd recomputes the
  chunk's logits in the backward pass (activation checkpointing), so at most ``chunk_size × V`` logits
  are alive at any time, forward or backward. Works with any head module, LoRA-wrapped heads included.
* :func:`linear_log_probs` (plain ``nn.Linear`` heads): TRL's ``ChunkedLogProbFunction``, which also
  chunks the vocabulary (online log-sum-exp) and runs a Triton fold on CUDA/XPU with a torch fallback
  elsewhere. It is reused rather than re-implemented: its shapes (``hidden [N, H]``, ``weight [V, H]``,
  ``targets [N]``) are exactly the gathered-positions layout used here.

:func:`selective_log_softmax` is the plain reduction for logits that already exist (chunked over rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["LogProbShapeError", "head_log_probs", "linear_log_probs", "selective_log_softmax"]

DEFAULT_CHUNK_SIZE = 512          # positions per head application (memory: chunk_size × V fp32 logits)
DEFAULT_VOCAB_CHUNK_SIZE = 8192   # vocabulary columns per tile in the linear back-end


class LogProbShapeError(ValueError):
    """Raised when hidden states, targets or head weights have inconsistent shapes."""


def _gathered_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per row, computed in fp32: ``logit[y] − logsumexp(logit)``."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``softmax(logits)``, computed ``chunk_size`` rows at a time.

    Args:
        logits: ``[..., V]`` scores.
        targets: ``[...]`` token ids (same leading shape as ``logits``).
        chunk_size: rows (flattened leading positions) reduced per step; bounds the fp32 copy.

    Returns:
        ``[...]`` fp32 log-probabilities.
    """
    if logits.shape[:-1] != targets.shape:
        raise LogProbShapeError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
                                "targets must have the logits' leading shape")
    if chunk_size < 1:
        raise LogProbShapeError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    parts = [_gathered_log_probs(flat_logits[s:s + chunk_size], flat_targets[s:s + chunk_size])
             for s in range(0, flat_targets.numel(), chunk_size)]
    out = torch.cat(parts) if parts else flat_logits.new_zeros(0, dtype=torch.float32)
    return out.reshape(targets.shape)


def head_log_probs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                   *, chunk_size: int = DEFAULT_CHUNK_SIZE, recompute: bool = True) -> torch.Tensor:
    """``log f(targets | hidden) = log softmax(head(hidden))[targets]`` for gathered positions.

    Args:
        head: callable mapping ``[n, d]`` hidden states to ``[n, V]`` logits (e.g. ``model.head``).
        hidden: ``[N, d]`` hidden states at the positions that count.
        targets: ``[N]`` token ids to score.
        chunk_size: positions per head call; at most ``chunk_size × V`` logits exist at once.
        recompute: under autograd, recompute each chunk's logits in the backward pass instead of keeping
            them (activation checkpointing); gradients are identical.

    Returns:
        ``[N]`` fp32 log-probabilities, differentiable with respect to ``hidden`` and the head's parameters.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise LogProbShapeError(f"expected hidden [N, d] and targets [N], got {tuple(hidden.shape)} "
                                f"and {tuple(targets.shape)}")
    if chunk_size < 1:
        raise LogProbShapeError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)

    def reduce_chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _gathered_log_probs(head(h), y)

    use_checkpoint = recompute and torch.is_grad_enabled()
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if use_checkpoint:
            parts.append(checkpoint(reduce_chunk, h, y, use_reentrant=False))
        else:
            parts.append(reduce_chunk(h, y))
    return torch.cat(parts)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor | None = None, *, logit_scale: float = 1.0,
                     vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE) -> torch.Tensor:
    """``log softmax(s · (hidden · weight^T + bias))[targets]`` without building ``[N, V]`` logits.

    Delegates to TRL's ``ChunkedLogProbFunction`` (vocabulary tiles with an online log-sum-exp; Triton
    fold on CUDA/XPU, torch elsewhere; fp32 accumulation; recomputing backward).

    Args:
        hidden: ``[N, d]`` hidden states.
        weight: ``[V, d]`` output projection (only rows of real tokens: slice padded vocab rows first).
        targets: ``[N]`` token ids in ``[0, V)``.
        bias: optional ``[V]`` bias.
        logit_scale: ``s``, multiplies the logits (e.g. ``1/sqrt(d_model)`` for scaled heads).
        vocab_chunk_size: vocabulary columns per tile.

    Returns:
        ``[N]`` fp32 log-probabilities, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    from trl.kernels import ChunkedLogProbFunction

    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LogProbShapeError(f"expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} "
                                f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise LogProbShapeError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    # positional arguments: hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
    # outputs (none besides the log-probabilities)
    logprobs = ChunkedLogProbFunction.apply(hidden.contiguous(), weight, bias, targets.contiguous(), 1.0,
                                            vocab_chunk_size, None, float(logit_scale), ())[0]
    return logprobs.float()
