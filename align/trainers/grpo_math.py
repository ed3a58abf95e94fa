"""The maths of diffusion GRPO (``docs/concepts.md`` §3): advantages, clipped surrogate, KL, aggregation.

The diffusion-LM objectives (SPG, wd1, ESPO) are in :mod:`align.trainers.objectives`; their names and
hyper-parameters are listed here with TRL's loss types.
"""

from __future__ import annotations

import math

import torch

#: ``loss_type``: TRL's names (its default is ``dapo``; dlm-align's is ``grpo``). Each sets the per-token
#: objective (:func:`policy_objective`) and its normalisation (:func:`aggregate`).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: loss types normalised by the completion tokens of the whole optimizer step (every micro-batch of the
#: accumulation window, every process); the others are normalised per micro-batch and divided by the number of
#: accumulation steps.
WINDOW_NORMALIZED = ("dapo", "cispo", "vespo")
#: the diffusion-LM objectives beside TRL's loss types (``docs/grpo.md``, "Objectives";
#: :mod:`align.trainers.objectives`): SPG (arXiv:2510.09541), wd1 (arXiv:2507.08838), ESPO (arXiv:2512.03759).
OBJECTIVES = ("spg", "wd1", "espo")
#: every value ``loss_type`` accepts.
ALL_LOSS_TYPES = LOSS_TYPES + OBJECTIVES
#: objectives without an importance ratio: they use the current policy's scores only (no old, no reference).
RATIO_FREE = ("spg", "wd1")
#: the estimators each objective is defined for (absent: any estimator).
OBJECTIVE_ESTIMATORS = {"spg": ("block", "elbo"), "espo": ("elbo", "coupled", "block")}
#: hyper-parameters of single loss types: name -> (loss type, default: TRL's, or the paper's for the objectives).
LOSS_ARGS = {
    "sapo_temperature_pos": ("sapo", 1.0),
    "sapo_temperature_neg": ("sapo", 1.05),
    "vespo_k_pos": ("vespo", 2.0),
    "vespo_lambda_pos": ("vespo", 3.0),
    "vespo_k_neg": ("vespo", 3.0),
    "vespo_lambda_neg": ("vespo", 2.0),
    "spg_beta": ("spg", 1.5),
    "spg_omega": ("spg", 0.5),
    "wd1_psi": ("wd1", 1.0),
}
#: the range each :data:`LOSS_ARGS` value must lie in (``check_range`` keywords); unlisted ones must be > 0.
LOSS_ARG_RANGES = {
    "vespo_k_pos": {"low": 0.0},
    "vespo_k_neg": {"low": 0.0},
    "spg_beta": {"low": 1.0},               # the EUBO is an upper bound for β ≥ 1
    "spg_omega": {"low": 0.0, "high": 1.0},
}
#: loss types whose objective is TRL's clipped surrogate (and which log ``clip_ratio/*``).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: ``scale_rewards`` and ``baseline`` of :func:`group_advantages`.
SCALE_REWARDS = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")


def constant_groups(r: torch.Tensor, G: int) -> torch.Tensor:
    """``[N/G]`` bool: groups whose valid (non-NaN) rewards are all equal; they carry no advantage signal."""
    rg = r.view(-1, G)
    valid = ~torch.isnan(rg)
    hi = torch.where(valid, rg, torch.full_like(rg, -torch.inf)).amax(1)
    lo = torch.where(valid, rg, torch.full_like(rg, torch.inf)).amin(1)
    return ~(hi > lo)


def group_advantages(r: torch.Tensor, G: int, *, scale_rewards: str = "group", baseline: str = "mean",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``A_i`` of rewards ``r`` [N] laid out as consecutive groups of ``G`` completions.

    ``A_i = r_i − mean_group(r)`` (``baseline="mean"``) or ``r_i − mean_{j≠i} r_j`` (``"leave_one_out"``),
    optionally divided by the group std (``scale_rewards="group"``) or the batch std (``"batch"``).
    NaN rewards (every reward function skipped the sample) give advantage 0 and do not enter the statistics.
    A group whose valid rewards are all equal gets exactly 0 (rounding in the mean cannot leak a signal).
    """
    if r.dim() != 1 or r.numel() % G:
        raise ValueError(f"rewards must be [N] with N a multiple of G={G}, got {tuple(r.shape)}")
    valid = ~torch.isnan(r)
    rg = torch.where(valid, r, torch.zeros_like(r)).view(-1, G)
    vg = valid.view(-1, G).to(r.dtype)
    n = vg.sum(1, keepdim=True)
    mean = rg.sum(1, keepdim=True) / n.clamp_min(1)
    if baseline == "mean":
        A = rg - mean
    elif baseline == "leave_one_out":
        # mean of the other valid members: (Σ r − r_i) / (n − 1)
        A = rg - (rg.sum(1, keepdim=True) - rg) / (n - 1).clamp_min(1)
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale_rewards == "group":
        var = (((rg - mean) ** 2) * vg).sum(1, keepdim=True) / (n - 1).clamp_min(1)
        A = A / (var.sqrt() + eps)
    elif scale_rewards == "batch":
        A = A / (r[valid].std() + eps if int(valid.sum()) > 1 else 1.0)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    signal = (vg > 0) & ~constant_groups(r, G)[:, None]
    return torch.where(signal, A, torch.zeros_like(A)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref): ``exp(ref − cur) − (ref − cur) − 1`` (elementwise, ≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, A: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element loss ``−min(ρA, clip(ρ, 1−ε, 1+ε_high)A)`` with ``ρ = exp(logp − old_logp)``.

    ``A`` broadcasts against ``logp``. Returns ``(loss, clipped)``, where ``clipped`` marks elements whose
    clipped term is the active one.
    """
    rho = torch.exp(logp - old_logp)
    unclipped = rho * A
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@torch.no_grad()
def vespo_weights(log_ratio: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, *, k_pos: float = 2.0,
                  lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's ``[N, 1]`` sequence weights ``φ(w) = exp(λ + k·log w − λ·w)`` (``φ(1) = 1``), without gradient.

    ``log w`` is the completion's summed log-ratio (each token's clamped to ±20; a ``[N, 1]`` ratio is used as
    it is), clamped to ``[log 1e-8, 20]``; ``(k, λ)`` are the ``_pos`` values where ``A ≥ 0``, else ``_neg``.
    """
    per = torch.clamp(log_ratio, -20.0, 20.0)
    seq = per if per.shape[1] == 1 else (per * mask).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, math.log(1e-8), 20.0)
    nonneg = A >= 0
    k = torch.where(nonneg, torch.full_like(A, k_pos), torch.full_like(A, k_neg))
    lam = torch.where(nonneg, torch.full_like(A, lambda_pos), torch.full_like(A, lambda_neg)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_objective(loss_type: str, log_ratio: torch.Tensor, A: torch.Tensor, logp: torch.Tensor,
                     mask: torch.Tensor | None = None, *, eps_low: float, eps_high: float,
                     sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0,
                     vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0
                     ) -> torch.Tensor:
    """Per-element policy loss of ``loss_type`` (TRL's ``_compute_loss``), before the KL term.

    ``log_ratio = log π̂_θ − log π̂_old`` ([N, L] per token, or [N, 1] per sequence), ``ρ = exp(log_ratio)``;
    ``A`` ([N, 1]) broadcasts against it; ``logp`` ([N, L]) is the current per-token log-likelihood estimate and
    ``mask`` ([N, L]) the completion positions (used by vespo only).

    * grpo, bnpo, dr_grpo, dapo, luspo: ``−min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A)``;
    * cispo: ``−sg[min(ρ, ε_high)] · A · logp`` (the ratio is capped and carries no gradient);
    * sapo: ``−σ(τ(ρ − 1)) · 4/τ · A`` with ``τ = sapo_temperature_pos`` where ``A > 0``, else ``_neg``;
    * vespo: ``−φ(w) · A · logp`` with :func:`vespo_weights` (no gradient through ``φ``).
    """
    if loss_type in CLIPPED_LOSS_TYPES:
        # the same operations as clipped_surrogate, so that grpo's loss is unchanged bit for bit
        rho = torch.exp(log_ratio)
        return -torch.minimum(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A)
    if loss_type == "cispo":
        return -torch.clamp(torch.exp(log_ratio), max=eps_high).detach() * A * logp
    if loss_type == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
        return -torch.sigmoid(tau * (torch.exp(log_ratio) - 1)) * 4 / tau * A
    if loss_type == "vespo":
        if mask is None:
            raise ValueError("loss_type 'vespo' needs the completion mask")
        phi = vespo_weights(log_ratio, A, mask, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg,
                            lambda_neg=vespo_lambda_neg)
        return -phi * A * logp
    raise ValueError(f"unknown loss_type {loss_type!r}")


def clip_regions(log_ratio: torch.Tensor, A: torch.Tensor, eps_low: float, eps_high: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's clipped regions: ``(ρ < 1 − ε_low and A < 0, ρ > 1 + ε_high and A > 0)``, elementwise.

    These are the elements where the clipped term of the surrogate is the active one (no gradient).
    """
    rho = torch.exp(log_ratio)
    return (rho < 1 - eps_low) & (A < 0), (rho > 1 + eps_high) & (A > 0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, gen_length: int, *,
              num_items: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a [N, L] (or [N, 1], broadcast over the mask) per-token loss over the completion ``mask``.

    TRL's normalisations (``docs/concepts.md`` §3.4), with ``m`` the mask and ``ℓ`` the loss:

    * grpo, sapo: ``(1/N) Σ_i Σ_k m ℓ / Σ_k m`` (each completion's token mean, then the mean over completions);
    * bnpo: ``Σ m ℓ / Σ m`` over this micro-batch;
    * dr_grpo: ``Σ m ℓ / (N · gen_length)``;
    * dapo, cispo, vespo: ``Σ m ℓ / num_items``, where ``num_items`` is the completion-token count of the whole
      optimizer step divided by the number of processes (the caller's; this micro-batch's ``Σ m`` if None), so
      that the micro-batch losses of one step add up to the token mean of the step;
    * luspo: ``(1/N) Σ_i Σ_k m ℓ`` (each completion weighted by its length).
    """
    m = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp_min(1)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * gen_length)
    if loss_type in WINDOW_NORMALIZED:
        total = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
        return (per_token * m).sum() / total.clamp_min(1)
    if loss_type == "luspo":
        return (per_token * m).sum(1).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}")
