"""Block-wise mask plans (``estimator: block``; SPG, Wang et al. 2025, arXiv:2510.09541, ``docs/concepts.md`` §2.8).

A semi-autoregressive sampler decodes the response block by block, left to right: while block ``k`` is being
denoised, the blocks before it are clean and the blocks after it are still all masks. The block plan scores the
response in those states. The response positions of sequence ``b`` (in order) are cut into ``K_b = ⌈L_b / c⌉``
blocks of ``c = block_length`` positions (the last one may be shorter); each of the ``n = num_samples`` rows

* picks a block ``k``: one random order of the sequence's blocks is drawn and row ``j`` takes the block at
  place ``j mod K_b``, so the rows of a sequence see different blocks when ``n ≤ K_b`` and each row's block is
  uniform on ``{0 … K_b − 1}``;
* masks ``l`` of the ``c_k`` positions of block ``k``, uniformly without replacement, with
  ``l ~ U{max(⌊c_k·t_min⌋, 1) … min(⌊c_k·t_max⌋, c_k)}``;
* masks every response position of the blocks after ``k`` and none of the blocks before it;
* masks each prompt position independently with probability ``p_mask_prompt``.

Two coefficient rules (``weighting``), with ``m_r`` the masked response positions of row ``r``:

* ``masked_mean`` (SPG's): ``coef = L_b / (n · m_r)`` on every masked response position, so a row contributes
  ``L_b`` times the mean log-likelihood of its masked tokens; ``coef = 1/(n·t_r)`` with ``t_r = m_r / L_b``.
* ``block_elbo``: ``coef = K_b · c_k / (n · l)`` on the masked positions of block ``k`` only (the later, fully
  masked blocks are context). With ``t_min = 0`` and ``t_max = 1`` this is unbiased for the ELBO of the block-wise
  factorisation ``log π(y | x) = Σ_k log π(y_k | x, y_{<k})`` with later blocks masked; for any range,
  ``E[Σ_r coef[r, i]] = 1`` at every response position.
"""

from __future__ import annotations

import torch

from align.likelihood.masks import (
    InvalidSettingError,
    MaskPlan,
    _as_generator,
    _check_num_samples,
    _mask_exactly,
    _plan,
    _uniform,
    _validate,
)

#: coefficient rules of :func:`draw_block_masks`.
BLOCK_WEIGHTINGS: tuple[str, ...] = ("masked_mean", "block_elbo")


def _check(block_length: int, t_min: float, t_max: float, p_mask_prompt: float, weighting: str) -> None:
    if not isinstance(block_length, int) or isinstance(block_length, bool) or block_length < 1:
        raise InvalidSettingError(f"block_length must be an int >= 1, got {block_length!r}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise InvalidSettingError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if not 0.0 <= p_mask_prompt < 1.0:
        raise InvalidSettingError(f"p_mask_prompt must be in [0, 1), got {p_mask_prompt}")
    if weighting not in BLOCK_WEIGHTINGS:
        raise InvalidSettingError(f"weighting must be one of {BLOCK_WEIGHTINGS}, got {weighting!r}")


def draw_block_masks(input_ids: torch.Tensor, response_mask: torch.Tensor, *,
                     generator: torch.Generator | int, attention_mask: torch.Tensor | None = None,
                     block_length: int = 32, num_samples: int = 2, t_min: float = 0.0, t_max: float = 1.0,
                     p_mask_prompt: float = 0.15, weighting: str = "masked_mean") -> MaskPlan:
    """SPG's block-wise masks: a random block partly masked, earlier blocks clean, later blocks fully masked.

    ``n = num_samples`` rows per sequence (SPG uses 2); see the module docstring for the draw and the two
    ``weighting`` rules. ``L_b`` is each sequence's own response length, so ragged batches are fine; with a
    response that starts right after the prompt, the blocks are the sampler's blocks when ``block_length`` is
    the rollout's. ``t`` of a row is the share of the response it masks.
    """
    input_ids, attention_mask, resp = _validate(input_ids, response_mask, attention_mask)
    _check_num_samples(num_samples)
    _check(block_length, t_min, t_max, p_mask_prompt, weighting)
    gen = _as_generator(generator)
    device, n, c = input_ids.device, num_samples, block_length
    B, T = input_ids.shape
    L = resp.sum(dim=1)                                                          # L_b
    K = (L + c - 1) // c                                                         # K_b = ⌈L_b / c⌉
    block = torch.where(resp, (resp.long().cumsum(dim=1) - 1) // c, torch.full_like(L[:, None], -1))
    # one random order of each sequence's blocks; row j takes the block at place j mod K_b
    k_max = int(K.max())
    order_key = _uniform(gen, B, k_max, dtype=torch.float64).to(device)
    order_key = order_key.masked_fill(torch.arange(k_max, device=device)[None] >= K[:, None], 2.0)
    order = order_key.argsort(dim=1)
    place = torch.arange(n, device=device)[None] % K[:, None]                   # [B, n]
    chosen = order.gather(1, place).reshape(-1)                                 # block k of each row, [R]
    L_r, K_r = L.repeat_interleave(n), K.repeat_interleave(n)
    block_r = block.repeat_interleave(n, dim=0)                                 # [R, T]
    size = torch.clamp(L_r - chosen * c, max=c)                                 # c_k (the last block may be shorter)
    lo = torch.floor(size.double() * t_min).long().clamp(min=1)
    hi = torch.minimum(torch.floor(size.double() * t_max).long(), size).maximum(lo)
    u = _uniform(gen, B * n, dtype=torch.float64).to(device)
    l = lo + (u * (hi - lo + 1).double()).long().clamp(max=hi - lo)             # l ~ U{lo … hi}
    in_block = block_r == chosen[:, None]
    part = _mask_exactly(in_block, l, gen)                                      # l positions of block k
    masked_y = part | (block_r > chosen[:, None])                               # later blocks: all masked
    prompt = (attention_mask & ~resp).repeat_interleave(n, dim=0)
    noise = _uniform(gen, B * n, T).to(device) < p_mask_prompt
    masked = masked_y | (prompt & noise)
    m = masked_y.sum(dim=1)
    if weighting == "masked_mean":
        coef = masked_y.double() * (L_r.double() / (n * m.double()))[:, None]   # L_b · mean over masked, / n
    else:
        coef = part.double() * (K_r * size).double()[:, None] / (n * l.double())[:, None]   # K_b · c_k / (n·l)
    return _plan("block", input_ids, attention_mask, resp, n, masked, coef, m.double() / L_r.double(), n)
