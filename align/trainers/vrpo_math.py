"""Preference losses on ELBO estimates (``docs/concepts.md`` §4): DPO and its family, implicit rewards, and the
estimator variance of the preference score.

For a pair ``(x, y_w, y_l)`` with ELBO estimates ``B̂_θ`` (policy) and ``B̂_ref`` (reference), all four scored with
the same (t, mask) draws for θ and ref:

    h = [B̂_θ(y_w) − B̂_ref(y_w)] − [B̂_θ(y_l) − B̂_ref(y_l)]           (the log-ratio margin)
    sigmoid (DPO):   −(1 − ε) log σ(β h) − ε log σ(−β h)            (ε = label_smoothing: conservative DPO)
    robust:          [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)
    ipo:             (h̄ − 1/(2β))²,  h̄ = the same margin with each log-ratio divided by its response length
    hinge:           max(0, 1 − β h)

The implicit rewards are ``r_w = β (B̂_θ − B̂_ref)(y_w)`` and ``r_l`` likewise; ``β h = r_w − r_l`` is the
preference score. As in TRL, several losses can be combined with weights (:func:`combined_loss`); ``sft`` is the
negative ELBO per chosen token, ``−Σ B̂_θ(y_w) / Σ L_w`` over the batch (with ``sigmoid``: RPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from align.likelihood import MaskPlan

#: preference losses (TRL's names).
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
#: every loss a stage may combine: the preference losses and ``sft`` on the chosen responses.
ALL_LOSS_TYPES = (*LOSS_TYPES, "sft")
#: losses that take ``label_smoothing``.
SMOOTHED_LOSSES = ("sigmoid", "robust")


@dataclass(frozen=True)
class PreferenceOutput:
    """Per-pair results of :func:`preference_loss` (all ``[B]``).

    Attributes:
        losses: the loss of each pair (differentiable).
        chosen_rewards, rejected_rewards: implicit rewards ``β (B̂_θ − B̂_ref)`` of the two responses (detached).
        margins: the log-ratio margin ``h`` (detached).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, *, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, lengths: torch.Tensor | None = None) -> PreferenceOutput:
    """The preference loss of each pair from its sequence estimates.

    Args:
        policy: ``[B, 2]`` estimates ``B̂_θ`` of (chosen, rejected); carries the gradient.
        reference: ``[B, 2]`` estimates ``B̂_ref`` of the same sequences (no gradient needed).
        loss_type: one of :data:`LOSS_TYPES`.
        beta: ``β``, the inverse temperature (``τ`` of IPO).
        label_smoothing: ``ε``, the assumed share of flipped labels (``sigmoid`` and ``robust`` only).
        lengths: ``[B, 2]`` response lengths in tokens; required by ``ipo``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {loss_type!r}; expected one of {LOSS_TYPES}")
    if label_smoothing and loss_type not in SMOOTHED_LOSSES:
        raise ValueError(f"label_smoothing applies to {SMOOTHED_LOSSES} only, not {loss_type!r}")
    if policy.shape != reference.shape or policy.dim() != 2 or policy.shape[1] != 2:
        raise ValueError(f"policy {tuple(policy.shape)} and reference {tuple(reference.shape)} must both be [B, 2]")
    ratios = policy - reference.to(policy.dtype)                     # log-ratio estimates of (chosen, rejected)
    h = ratios[:, 0] - ratios[:, 1]
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        if lengths is None:
            raise ValueError("the ipo loss needs the response lengths")
        per_token = ratios / lengths.to(ratios.dtype).clamp_min(1.0)
        losses = (per_token[:, 0] - per_token[:, 1] - 1.0 / (2.0 * beta)) ** 2
    rewards = beta * ratios.detach()
    return PreferenceOutput(losses, rewards[:, 0], rewards[:, 1], h.detach())


def combined_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, *, loss_types: list[str],
                  weights: list[float], beta: float, label_smoothing: float = 0.0) -> PreferenceOutput:
    """``Σ_k w_k · loss_k`` per pair (rewards and margins as in :func:`preference_loss`).

    ``sft`` is the batch's negative ELBO per chosen token, ``−Σ_b B̂_θ(y_w,b) / Σ_b L_w,b``, the same for every pair
    (TRL's ``sft`` loss type on ELBO estimates); ``label_smoothing`` goes to the losses that take it.
    """
    if len(loss_types) != len(weights) or not loss_types:
        raise ValueError(f"need one weight per loss type, got {loss_types} and {weights}")
    total = torch.zeros(policy.shape[0], dtype=policy.dtype, device=policy.device)
    base = None
    for name, weight in zip(loss_types, weights, strict=True):
        if name == "sft":
            nll = -policy[:, 0].sum() / lengths[:, 0].to(policy.dtype).sum().clamp_min(1.0)
            total = total + weight * nll.expand(policy.shape[0])
            continue
        out = preference_loss(policy, reference, loss_type=name, beta=beta, lengths=lengths,
                              label_smoothing=label_smoothing if name in SMOOTHED_LOSSES else 0.0)
        total, base = total + weight * out.losses, out
    if base is None:                                                    # sft alone: rewards of the sigmoid form
        base = preference_loss(policy.detach(), reference, loss_type="sigmoid", beta=beta)
    return PreferenceOutput(total, base.chosen_rewards, base.rejected_rewards, base.margins)


def score_variance(policy_rows: torch.Tensor, reference_rows: torch.Tensor, beta: float) -> torch.Tensor:
    """Estimated variance of each pair's preference score ``β h`` over the estimator's draws, ``[B]``.

    ``policy_rows`` and ``reference_rows`` are ``[B, 2, n]``: the contribution of each of the ``n`` rows (masked
    views) to ``B̂`` of the chosen and the rejected response (``LikelihoodEstimate.row_logp``). With
    ``a_j = β[(θ − ref)_{w,j} − (θ − ref)_{l,j}]`` the score is ``Σ_j a_j``; the estimate is ``n · s²(a)``, the
    variance of the sum if the ``n`` terms were independent. Stratified rows are not, so for them it is an upper
    bound. NaN when ``n < 2``.
    """
    diff = policy_rows.double() - reference_rows.double()
    a = beta * (diff[:, 0] - diff[:, 1])                             # [B, n]
    n = a.shape[-1]
    if n < 2:
        return torch.full(a.shape[:1], float("nan"), dtype=torch.float64, device=a.device)
    return n * a.var(dim=-1, unbiased=True)


def stack_plans(plans: list[MaskPlan], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> MaskPlan:
    """One plan for a batch from plans drawn on consecutive groups of its sequences.

    Each plan of ``plans`` was drawn on the next ``plan.batch_size`` sequences of the batch, cut to their own
    width (right padding only); its masks and coefficients are padded to the batch width ``T`` with nothing masked
    and nothing scored, so the draws of a group do not depend on what it is batched with.
    """
    T = input_ids.shape[1]
    masked, coef, row_seq = [], [], []
    offset = 0
    for p in plans:
        extra = T - p.masked.shape[1]
        if extra < 0:
            raise ValueError(f"a plan is {p.masked.shape[1]} positions wide, the batch only {T}")
        masked.append(torch.cat([p.masked, p.masked.new_zeros(p.num_rows, extra)], dim=1))
        coef.append(torch.cat([p.coef, p.coef.new_zeros(p.num_rows, extra)], dim=1))
        row_seq.append(p.row_seq + offset)
        offset += p.batch_size
    if offset != input_ids.shape[0]:
        raise ValueError(f"the plans cover {offset} sequences, the batch has {input_ids.shape[0]}")
    first = plans[0]
    return MaskPlan(first.estimator, input_ids, attention_mask.bool(), response_mask.bool(), torch.cat(row_seq),
                    torch.cat(masked), torch.cat(coef), torch.cat([p.t for p in plans]), first.num_samples)
