"""The maths of diffusion GRPO (``docs/concepts.md`` §3): advantages, clipped surrogate, KL, aggregation."""

from __future__ import annotations

import torch

#: ``loss_type`` of :func:`aggregate`.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
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


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, gen_length: int) -> torch.Tensor:
    """Reduce a [N, L] per-token loss over the completion ``mask`` (``loss_type`` of TRL).

    grpo: mean over each completion's tokens, then over completions; bnpo: over all tokens of the batch;
    dr_grpo: sum divided by ``N · gen_length`` (``L``, every generated position).
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp_min(1)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * gen_length)
    raise ValueError(f"unknown loss_type {loss_type!r}")
