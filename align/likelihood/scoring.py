"""Sequence-likelihood estimators for masked diffusion models (``docs/concepts.md`` §2–§4).

``log π_θ(y | x)`` is intractable for a masked diffusion model; the estimators here return Monte Carlo
surrogates together with their per-token contributions:

* :func:`one_step` — diffu-GRPO (d1): one forward pass, completion fully masked, prompt noised.
* :func:`coupled` — coupled-GRPO (DiffuCoder): complementary masks ``U < t`` / ``U ≥ t`` plus the full view.
* :func:`elbo` — the ELBO ``B(y|x)`` with ``sampler="t"`` (naive), ``"l_stratified"`` (LLaDA evaluation,
  lower variance) or ``"quadrature"`` (GDPO-style Gauss–Legendre nodes).
* :func:`trace` — TraceRL's trajectory views: each token scored in the context the sampler had when it
  decoded it (needs the rollout's ``commit_step``).

Draws and evaluation are separate: :func:`draw_masks` (or ``draw_*_masks``) returns a :class:`MaskPlan`
that holds every random choice, and :func:`score_plan` scores a plan under a model. Evaluating one plan
under θ, θ_old and the reference shares the (t, mask) draws (VRPO's antithetic sharing), so
``B̂_θ − B̂_ref`` loses most of its Monte Carlo noise and the importance ratio at the first inner
iteration is exactly 1. Use ``torch.no_grad()`` around old / reference evaluations.

The model needs only ``model.hidden_states(input_ids, attention_mask=...)``, ``model.head(h)`` and
``model.mask_token_id``. Log-probabilities are computed only at the positions that count: their hidden
states are gathered and the head is applied there, in chunks (:mod:`align.kernels.logprob`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from align.kernels.logprob import DEFAULT_CHUNK_SIZE, head_log_probs, linear_log_probs
from align.likelihood.masks import (
    InvalidSettingError,
    MaskPlan,
    draw_coupled_masks,
    draw_elbo_masks,
    draw_one_step_masks,
    draw_trace_masks,
)

Backend = Literal["head", "linear"]


@dataclass(frozen=True)
class LikelihoodEstimate:
    """The result of evaluating a :class:`MaskPlan` under one model.

    Attributes:
        seq_logp: ``[B]`` per-sequence estimate ``B̂(y_b | x_b) = Σ_i token_logp[b, i]``.
        token_logp: ``[B, T]`` per-token contributions ``Σ_r coef[r, i] · log f(y_i | x, z_r)_i`` (zero off the
            response). For a TRL-style split (prompt width ``P``), ``token_logp[:, P:]`` aligns with the
            completion ids.
        row_logp: ``[R]`` contribution of each row (``seq_logp`` is their sum per sequence).
        position_logp: ``[R, T]`` unweighted ``log f(y_i | x, z_r)_i`` at the positions that count, else 0.
        plan: the plan that was evaluated.
    """

    seq_logp: torch.Tensor
    token_logp: torch.Tensor
    row_logp: torch.Tensor
    position_logp: torch.Tensor
    plan: MaskPlan


def _linear_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Weight, bias and logit scale of a plain ``nn.Linear`` output head, sliced to the real vocabulary."""
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    if type(layer) is not nn.Linear:
        raise InvalidSettingError("backend='linear' needs model.get_output_embeddings() to be a plain "
                                  f"nn.Linear (got {type(layer).__name__}); use backend='head'")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or layer.weight.shape[0]
    scale = 1.0 / math.sqrt(config.d_model) if getattr(config, "scale_logits", False) else 1.0
    bias = layer.bias[:vocab] if layer.bias is not None else None
    return layer.weight[:vocab], bias, scale


def _linear_log_probs_checked(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The ``"linear"`` back-end, after checking on one row that it reproduces ``model.head``."""
    weight, bias, scale = _linear_head(model)
    with torch.no_grad():
        probe = model.head(h[:1]).float()
        mine = (h[:1].float() @ weight.float().T + (0.0 if bias is None else bias.float())) * scale
    if probe.shape != mine.shape or not torch.allclose(probe, mine, rtol=1e-3, atol=1e-3):
        raise InvalidSettingError("backend='linear' does not reproduce model.head on this model; use backend='head'")
    return linear_log_probs(h, weight, y, bias, logit_scale=scale)


def score_plan(model: nn.Module, plan: MaskPlan, *, micro_batch_size: int | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, backend: Backend = "head") -> LikelihoodEstimate:
    """Score ``plan`` under ``model``: ``B̂(y_b|x_b) = Σ_r Σ_i coef[r, i] · log f_θ(y_i | x, z_r)_i``.

    Rows are built as ``z_r = input_ids[row_seq[r]]`` with ``plan.masked[r]`` replaced by
    ``model.mask_token_id``; rows with no position that counts are skipped. The remaining rows run through
    ``model.hidden_states`` ``micro_batch_size`` rows at a time (all at once if None); hidden states are
    gathered at the counted positions and turned into log-probabilities there only.

    Args:
        model: exposes ``hidden_states``, ``head`` and ``mask_token_id``.
        plan: from :func:`draw_masks`; must be on the model's device (``plan.to(device)``).
        micro_batch_size: rows per forward pass (memory bound); the result does not depend on it.
        chunk_size: positions per head application (``chunk_size × V`` logits alive at once).
        backend: ``"head"`` (any head, chunked over positions, recomputed in backward) or ``"linear"``
            (plain ``nn.Linear`` head: TRL's vocabulary-chunked kernel).

    Returns:
        A :class:`LikelihoodEstimate`; differentiable with respect to the model's parameters.
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise InvalidSettingError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    if backend not in ("head", "linear"):
        raise InvalidSettingError(f"unknown log-prob backend {backend!r}; expected 'head' or 'linear'")
    mask_id = int(model.mask_token_id)
    B, T = plan.input_ids.shape
    device = plan.input_ids.device
    counts = plan.coef != 0                                                   # positions that count
    active = counts.any(dim=1).nonzero().flatten()
    # nothing counts (e.g. every t-sampled row drew no mask): still run one row so the estimate (all
    # zeros) stays attached to the graph and backward() works
    anchor_only = active.numel() == 0
    if anchor_only:
        active = torch.zeros(1, dtype=torch.long, device=device)
    full_attention = bool(plan.attention_mask.all())
    step = micro_batch_size or max(int(active.numel()), 1)

    positions = torch.arange(T, device=device)
    token_logp = torch.zeros(B, T, dtype=torch.float32, device=device)
    row_logp = torch.zeros(plan.num_rows, dtype=torch.float32, device=device)
    position_logp = torch.zeros(plan.num_rows, T, dtype=torch.float32, device=device)
    for s in range(0, int(active.numel()), step):
        rows = active[s:s + step]
        seq = plan.row_seq[rows]
        clean = plan.input_ids[seq]
        z = clean.masked_fill(plan.masked[rows], mask_id)                     # z_r: masked view of (x, y)
        attn = None if full_attention else plan.attention_mask[seq].long()
        h = model.hidden_states(z, attention_mask=attn)                       # [r, T, d]
        sel = counts[rows]                                                    # [r, T]
        h_sel, y_sel = h[sel], clean[sel]                                     # gather before the head
        if backend == "linear" and h_sel.shape[0] > 0:
            logp = _linear_log_probs_checked(model, h_sel, y_sel)
        else:
            logp = head_log_probs(model.head, h_sel, y_sel, chunk_size=chunk_size)   # log f_θ(y_i | x, z_r)_i
        contrib = logp * plan.coef[rows][sel]                                 # coef[r, i] · log f
        r_idx = rows.unsqueeze(1).expand_as(sel)[sel]
        b_idx = seq.unsqueeze(1).expand_as(sel)[sel]
        i_idx = positions.unsqueeze(0).expand_as(sel)[sel]
        token_logp = token_logp.index_put((b_idx, i_idx), contrib, accumulate=True)
        row_logp = row_logp.index_add(0, r_idx, contrib)
        position_logp = position_logp.index_put((r_idx, i_idx), logp)
        if anchor_only:   # every parameter, the head included, stays in the graph (DDP waits for each gradient)
            token_logp = token_logp + 0.0 * (h.float().sum() + model.head(h[:1, :1]).float().sum())
    return LikelihoodEstimate(token_logp.sum(dim=1), token_logp, row_logp, position_logp, plan)


def one_step(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, *,
             generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
             p_mask_prompt: float = 0.15, **score_kwargs: object) -> LikelihoodEstimate:
    """diffu-GRPO (d1) estimate: ``token_logp[b, k] = log f_θ(y_k | x̃, M…M)_k`` (one forward pass).

    Draws with :func:`draw_one_step_masks` and scores with :func:`score_plan` (``score_kwargs``).
    """
    plan = draw_one_step_masks(input_ids, response_mask, generator=generator, attention_mask=attention_mask,
                               p_mask_prompt=p_mask_prompt)
    return score_plan(model, plan, **score_kwargs)


def coupled(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, *,
            generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
            t_min: float = 0.2, t_max: float = 0.8, full_mask_view: bool = True,
            **score_kwargs: object) -> LikelihoodEstimate:
    """Coupled-GRPO (DiffuCoder) estimate: ``½[log f(y_k | full mask) + w_k log f(y_k | coupled pass)]``.

    ``w_k = 1/t`` for tokens masked in pass 1 (``U < t``), ``1/(1−t)`` in pass 2; see
    :func:`draw_coupled_masks`. Three rows per sequence (two without the full view).
    """
    plan = draw_coupled_masks(input_ids, response_mask, generator=generator, attention_mask=attention_mask,
                              t_min=t_min, t_max=t_max, full_mask_view=full_mask_view)
    return score_plan(model, plan, **score_kwargs)


def elbo(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, *,
         generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
         sampler: str = "l_stratified", num_samples: int = 1, n_nodes: int = 2, eps: float = 0.0,
         **score_kwargs: object) -> LikelihoodEstimate:
    """ELBO estimate of ``log π(y|x)`` with ``num_samples`` masked views per sequence in one batch.

    ``sampler``: ``"t"`` (``B = E_t E_z[(1/t) Σ_{z_i=M} log f]``), ``"l_stratified"``
    (``B = E_l E_z[(L/l) Σ_{z_i=M} log f]``, stratified ``l``) or ``"quadrature"`` (Gauss–Legendre in ``t``);
    see :func:`draw_elbo_masks`.
    """
    plan = draw_elbo_masks(input_ids, response_mask, generator=generator, attention_mask=attention_mask,
                           sampler=sampler, num_samples=num_samples, n_nodes=n_nodes, eps=eps)
    return score_plan(model, plan, **score_kwargs)


def trace(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor, *, commit_step: torch.Tensor,
          attention_mask: torch.Tensor | None = None, num_views: int = 4,
          **score_kwargs: object) -> LikelihoodEstimate:
    """Trajectory estimate (TraceRL): ``Σ_v Σ_{i in chunk v} log f_θ(y_i | x, z_{e_v})_i``.

    ``commit_step`` is the rollout's record of when each position was decoded; see :func:`draw_trace_masks`.
    ``num_views`` rows per sequence.
    """
    plan = draw_trace_masks(input_ids, response_mask, commit_step=commit_step, attention_mask=attention_mask,
                            num_views=num_views)
    return score_plan(model, plan, **score_kwargs)
