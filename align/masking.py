"""Forward process of masked diffusion and the SFT objective (``docs/concepts.md`` §1).

Per sequence b draw ``t_b ~ U(t_min, t_max)`` and set ``p_mask_b = (1 - ε)·t_b + ε``; each response token
is replaced by the mask token ``M`` independently with probability ``p_mask_b``; the prompt is never
masked. The loss reads the model's log-probability of the true token at every masked response position.

Three normalisations of the SFT loss are offered (``normalization``):

* ``"sequence"`` (LLaDA guidelines):
  ``L = (1/B) Σ_b (1/L_b) Σ_{i ∈ resp_b, z_i = M} −log f_θ(y_i | x, z)_i / p_mask_b``
* ``"token"`` (d1): the same weighted sum divided by the batch's total response length ``Σ_b L_b``.
* ``"masked"`` (dLLM-RL, LLaDA 2.0): mean of ``−log f_θ`` over all masked tokens, no ``1/p_mask`` weight
  (use with ``t_min``/``t_max`` such as 0.1/0.9).

All randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Normalization = Literal["sequence", "token", "masked"]
NORMALIZATIONS: tuple[str, ...] = ("sequence", "token", "masked")


class MaskingError(ValueError):
    """Raised for inconsistent inputs to the forward process."""


@dataclass
class MaskedBatch:
    """A noised batch.

    Attributes:
        noisy_ids: ``z`` [B, T]: input ids with masked response positions replaced by ``M``.
        masked: [B, T] bool, positions that were masked (always inside the response).
        p_mask: [B] masking probability of each sequence.
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    p_mask: torch.Tensor


def sample_p_mask(batch_size: int, *, generator: torch.Generator, eps: float = 1e-3, t_min: float = 0.0,
                  t_max: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw ``p_mask = (1 − ε)·t + ε`` with ``t ~ U(t_min, t_max)`` for each of ``batch_size`` sequences."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise MaskingError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if not 0.0 <= eps < 1.0:
        raise MaskingError(f"eps must be in [0, 1), got {eps}")
    t = t_min + (t_max - t_min) * torch.rand(batch_size, generator=generator, device=generator.device)
    return ((1.0 - eps) * t + eps).to(device)


def forward_process(input_ids: torch.Tensor, response_mask: torch.Tensor, mask_id: int, *,
                    generator: torch.Generator, eps: float = 1e-3, t_min: float = 0.0,
                    t_max: float = 1.0) -> MaskedBatch:
    """Mask each response token independently with its sequence's ``p_mask`` (the prompt never).

    Args:
        input_ids: [B, T] clean token ids (prompt + response + trained padding).
        response_mask: [B, T] bool, True where a token is a training target (response and trained EOS).
        mask_id: id of the mask token ``M``.
        generator: source of randomness (CPU generator; draws are moved to the ids' device).
        eps, t_min, t_max: see :func:`sample_p_mask`.
    """
    if input_ids.shape != response_mask.shape:
        raise MaskingError(f"input_ids {tuple(input_ids.shape)} and response_mask "
                           f"{tuple(response_mask.shape)} differ in shape")
    B, T = input_ids.shape
    p_mask = sample_p_mask(B, generator=generator, eps=eps, t_min=t_min, t_max=t_max, device=input_ids.device)
    u = torch.rand(B, T, generator=generator, device=generator.device).to(input_ids.device)
    masked = (u < p_mask[:, None]) & response_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return MaskedBatch(noisy_ids=noisy, masked=masked, p_mask=p_mask)


def sft_loss(nll: torch.Tensor, batch: MaskedBatch, response_mask: torch.Tensor,
             normalization: Normalization = "sequence") -> torch.Tensor:
    """Reduce per-masked-token NLL to the SFT loss (module docstring gives the three formulas).

    Args:
        nll: [N] negative log-likelihoods at the masked positions (row-major order).
        batch: the noised batch the NLL was computed on.
        response_mask: [B, T] bool, the trained response positions (``L_b`` = its row sums).
        normalization: ``"sequence"``, ``"token"`` or ``"masked"``.
    """
    if normalization not in NORMALIZATIONS:
        raise MaskingError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    B = batch.masked.shape[0]
    row = torch.nonzero(batch.masked, as_tuple=True)[0]           # sequence index of each masked token
    L_b = response_mask.sum(dim=1).clamp_min(1).to(nll.dtype)     # response length incl. trained EOS
    if normalization == "masked":
        return nll.sum() / max(int(nll.numel()), 1)
    weighted = nll / batch.p_mask[row].to(nll.dtype)              # −log f_θ / p_mask_b
    if normalization == "token":
        return weighted.sum() / L_b.sum()
    per_seq = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, row, weighted)
    return (per_seq / L_b).mean()
