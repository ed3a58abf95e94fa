"""Exact ELBO of a short response by enumerating all ``2^L`` masks (tests and benchmarks only).

Let ``S_k = Σ_{|m| = k} Σ_{i ∈ m} log f(y_i | x, z_m)_i`` be the summed masked log-likelihood over every
mask ``m`` of the response with ``k`` masked tokens (``z_m``: ``y`` with ``m`` replaced by ``M``). Every
estimator's expectation is a weighted sum of the ``S_k``:

t-sampled ELBO, ``t ~ U(0,1)``, independent Bernoulli(t) masks, weight ``1/t``::

    E_t E_z[(1/t) Σ_{i∈z} log f] = Σ_m  ∫_0^1 (1/t) t^k (1−t)^(L−k) dt · Σ_{i∈m} log f
                               = Σ_k  B(k, L−k+1) · S_k,   B(k, L−k+1) = Γ(k)Γ(L−k+1)/Γ(L+1) = (k−1)!(L−k)!/L!

l-sampled ELBO, ``l ~ U{1..L}``, exactly ``l`` masked uniformly, weight ``L/l``; a mask with ``k`` masked
tokens has probability ``(1/L)·1/C(L,k)``, so its weight is::

    (1/L) · (1/C(L,k)) · (L/k) = k!(L−k)!/(L!·k) = (k−1)!(L−k)!/L!

the same number: both forms estimate the same ``B(y|x)`` (:func:`elbo_mask_weight` computes either, and the
tests check they agree). The empty mask (``k = 0``) contributes nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from align.kernels.logprob import head_log_probs
from align.likelihood.masks import EmptyResponseError, InvalidSettingError, ShapeMismatchError, gauss_legendre_01

__all__ = [
    "coupled_expectation",
    "elbo_from_masked_sums",
    "elbo_mask_weight",
    "exact_elbo",
    "exact_masked_sums",
    "quadrature_expectation",
]

MAX_EXACT_LENGTH = 16


def elbo_mask_weight(k: int, L: int, form: str = "t") -> float:
    """Weight of one mask with ``k`` of ``L`` tokens masked in the exact ELBO.

    ``form="t"``: ``B(k, L−k+1) = Γ(k)Γ(L−k+1)/Γ(L+1)`` (t-integral); ``form="l"``: ``(1/L)(1/C(L,k))(L/k)``.
    Zero for ``k = 0``.
    """
    if not 0 <= k <= L or L < 1:
        raise InvalidSettingError(f"need 0 <= k <= L and L >= 1, got k={k}, L={L}")
    if k == 0:
        return 0.0
    if form == "t":
        return math.exp(math.lgamma(k) + math.lgamma(L - k + 1) - math.lgamma(L + 1))
    if form == "l":
        return (1.0 / L) * (1.0 / math.comb(L, k)) * (L / k)
    raise InvalidSettingError(f"unknown form {form!r}; expected 't' or 'l'")


def _as_1d(ids: torch.Tensor, name: str) -> torch.Tensor:
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ShapeMismatchError(f"{name} must be 1-D (or [1, n]), got shape {tuple(ids.shape)}")
    return ids


def exact_masked_sums(model: nn.Module, prompt_ids: torch.Tensor, response_ids: torch.Tensor, *,
                      micro_batch_size: int = 1024, max_length: int = MAX_EXACT_LENGTH) -> torch.Tensor:
    """``S_k`` for ``k = 0..L``: summed ``log f(y_i | x, z_m)_i`` over every mask ``m`` with ``|m| = k``.

    Args:
        model: exposes ``hidden_states``, ``head`` and ``mask_token_id``.
        prompt_ids: ``[P]`` prompt ids (never masked).
        response_ids: ``[L]`` response ids, ``1 <= L <= max_length`` (``2^L − 1`` rows are evaluated).
        micro_batch_size: rows per forward pass.

    Returns:
        ``[L + 1]`` float64 tensor, differentiable with respect to the model's parameters.
    """
    prompt_ids, response_ids = _as_1d(prompt_ids, "prompt_ids"), _as_1d(response_ids, "response_ids")
    L, P = int(response_ids.numel()), int(prompt_ids.numel())
    if L == 0:
        raise EmptyResponseError("exact_masked_sums needs a non-empty response")
    if max_length < L:
        raise InvalidSettingError(f"response length {L} > max_length {max_length}: 2^L masks is too many")
    device = response_ids.device
    codes = torch.arange(1, 2 ** L, device=device)
    masks = ((codes.unsqueeze(1) >> torch.arange(L, device=device)) & 1).bool()      # [2^L − 1, L]
    k = masks.sum(dim=1)
    S = torch.zeros(L + 1, dtype=torch.float64, device=device)
    for s in range(0, masks.shape[0], micro_batch_size):
        m = masks[s:s + micro_batch_size]
        z_y = response_ids.unsqueeze(0).expand_as(m).masked_fill(m, int(model.mask_token_id))
        z = torch.cat([prompt_ids.unsqueeze(0).expand(m.shape[0], P), z_y], dim=1)
        h = model.hidden_states(z)[:, P:]                                            # [r, L, d]
        logp = head_log_probs(model.head, h[m], response_ids.unsqueeze(0).expand_as(m)[m])
        row = torch.arange(m.shape[0], device=device).unsqueeze(1).expand_as(m)[m]
        totals = torch.zeros(m.shape[0], dtype=torch.float64, device=device).index_add(0, row, logp.double())
        S = S.index_add(0, k[s:s + micro_batch_size], totals)
    return S


def elbo_from_masked_sums(S: torch.Tensor) -> torch.Tensor:
    """Exact ELBO ``B(y|x) = Σ_{k≥1} B(k, L−k+1) · S_k`` from :func:`exact_masked_sums`."""
    L = S.shape[0] - 1
    w = torch.tensor([elbo_mask_weight(k, L) for k in range(L + 1)], dtype=S.dtype, device=S.device)
    return (w * S).sum()


def exact_elbo(model: nn.Module, prompt_ids: torch.Tensor, response_ids: torch.Tensor, *,
               micro_batch_size: int = 1024) -> torch.Tensor:
    """Exact ELBO of ``response_ids`` given ``prompt_ids`` by enumerating all ``2^L`` masks (``L <= 16``).

    Equals the expectation of both the t-sampled and the l-sampled ELBO estimators (module docstring).
    Returns a float64 scalar, differentiable with respect to the model's parameters.
    """
    return elbo_from_masked_sums(exact_masked_sums(model, prompt_ids, response_ids,
                                                   micro_batch_size=micro_batch_size))


def _beta_integrals(L: int, a: float, b: float, mirrored: bool = False) -> np.ndarray:
    """``∫_a^b t^(k−1) (1−t)^(L−k) dt`` for ``k = 0..L`` (0 at k = 0); ``mirrored`` swaps ``t`` and ``1−t``.

    The integrand is a polynomial of degree ``L − 1``; Gauss–Legendre with ``L//2 + 1`` nodes is exact.
    """
    x, w = gauss_legendre_01(L // 2 + 1)
    t = a + (b - a) * x
    if mirrored:
        t = 1.0 - t
    out = np.zeros(L + 1)
    for k in range(1, L + 1):
        out[k] = (b - a) * np.sum(w * t ** (k - 1) * (1.0 - t) ** (L - k))
    return out


def coupled_expectation(S: torch.Tensor, t_min: float = 0.2, t_max: float = 0.8,
                        full_mask_view: bool = True) -> torch.Tensor:
    """Expectation of the coupled-GRPO sequence estimate (no prompt noise).

    Pair: ``(1/(b−a)) ∫_a^b [(1/t) g(t) + (1/(1−t)) g̃(t)] dt`` with ``g(t) = Σ_k S_k t^k (1−t)^(L−k)`` (pass 1,
    masked w.p. ``t``) and ``g̃(t) = Σ_k S_k (1−t)^k t^(L−k)`` (pass 2, masked w.p. ``1 − t``). The fully masked
    view is ``S_L``; with it the estimate is ``½ S_L + ½ pair``.
    """
    L = S.shape[0] - 1
    pair_w = (_beta_integrals(L, t_min, t_max) + _beta_integrals(L, t_min, t_max, mirrored=True)) / (t_max - t_min)
    pair = (torch.as_tensor(pair_w, dtype=S.dtype, device=S.device) * S).sum()
    return 0.5 * S[L] + 0.5 * pair if full_mask_view else pair


def quadrature_expectation(S: torch.Tensor, n_nodes: int = 2) -> torch.Tensor:
    """Expectation of the quadrature estimator: ``Σ_m (w_m / t_m) · S_{l_m} / C(L, l_m)``, ``l_m = ⌈t_m·L⌉``."""
    L = S.shape[0] - 1
    t_nodes, w_nodes = gauss_legendre_01(n_nodes)
    total = S.new_zeros(())
    for t_m, w_m in zip(t_nodes, w_nodes):
        l_m = min(max(math.ceil(t_m * L - 1e-9), 1), L)
        total = total + (w_m / t_m) * S[l_m] / math.comb(L, l_m)
    return total
