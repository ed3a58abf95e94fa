"""The policy loss of one GRPO inner iteration on one micro-batch of buffered rollouts (``docs/concepts.md`` §3).

:func:`policy_loss` scores iteration ``k``'s mask plan under the current policy (with gradients) and combines
it with the buffered old and reference scores into ``loss_type``'s objective, its KL term and its
normalisation (:mod:`align.trainers.grpo_math`); the diffusion-LM objectives ``spg``, ``wd1`` and ``espo`` go
through :func:`objective_loss` (:mod:`align.trainers.objectives`).
"""

from __future__ import annotations

from typing import Any

import torch

from align.likelihood import LikelihoodEstimate, score_plan
from align.trainers.grpo_config import GRPOOptions
from align.trainers.grpo_math import OBJECTIVES, aggregate, k3_kl, policy_objective
from align.trainers.grpo_metrics import policy_metrics, spg_metrics
from align.trainers.objectives import espo_objective, k2_kl, spg_objective, spg_upper_bound, wd1_loss


def policy_loss(o: GRPOOptions, scorer: torch.nn.Module, ro: Any, k: int, *, window_tokens: float | None,
                guard: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of inner iteration ``k`` on rollout ``ro`` and the metrics it logs.

    Args:
        o: the stage's options.
        scorer: the current policy (``hidden_states``/``head``/``mask_token_id``, through the wrapped model's
            forward so that distributed hooks fire).
        ro: a :class:`align.trainers.grpo.Rollout`.
        k: inner iteration (``0 <= k < num_iterations``); at ``k = 0`` the old scores are the current ones detached.
        window_tokens: completion tokens per process in the optimizer step (window-normalised loss types).
        guard: the trainer's non-finite guard; the loss components are recorded on it.
    """
    cur = score_plan(scorer, ro.plans[k])
    if o.loss_type in OBJECTIVES:
        return objective_loss(o, cur, ro, k, guard=guard)
    old, ref = ro.old[k], ro.ref[k]
    eps_hi = o.epsilon if o.epsilon_high is None else o.epsilon_high
    P, A, mask = ro.prompt_len, ro.advantages[:, None], ro.completion_mask
    logp = cur.token_logp[:, P:]
    if o.is_level == "token":                    # [N, L]
        log_ratio = logp - (logp.detach() if old is None else old.token_logp[:, P:])
    else:                                        # [N, 1]: one ratio per completion, broadcast over its tokens
        seq = cur.seq_logp
        log_ratio = (seq - (seq.detach() if old is None else old.seq_logp))[:, None]
    per_tok = policy_objective(o.loss_type, log_ratio, A, logp, mask, eps_low=o.epsilon, eps_high=eps_hi,
                               **o.loss_args)
    guard.components.record({"grpo/policy": per_tok, "grpo/logp": logp, "grpo/advantages": A}, where=mask)
    kl = None
    if ref is not None:
        if o.is_level == "token":
            kl = k3_kl(logp, ref.token_logp[:, P:])
        else:
            n_tok = mask.sum(1).clamp_min(1).to(cur.seq_logp.dtype)
            kl = k3_kl(cur.seq_logp / n_tok, ref.seq_logp / n_tok)[:, None]  # per-token average likelihoods
        per_tok = per_tok + o.beta * kl
        guard.components.record({"grpo/kl": kl}, where=mask)
    loss = aggregate(per_tok, mask, o.loss_type, o.gen_length, num_items=window_tokens)
    metrics = policy_metrics(o.loss_type, log_ratio, A, mask, eps_low=o.epsilon, eps_high=eps_hi, kl=kl,
                             token_level=o.is_level == "token", loss_args=o.loss_args)
    return loss, metrics


def objective_loss(o: GRPOOptions, cur: LikelihoodEstimate, ro: Any, k: int, *, guard: Any
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of a diffusion-LM objective (``spg``, ``wd1``, ``espo``) on rollout ``ro`` at inner iteration ``k``.

    ``cur`` is iteration ``k``'s plan scored under the current policy. ``spg`` and ``wd1`` use it alone (the
    buffered old scores, if any, are not read); ``espo`` also reads the old (``k > 0``) and reference
    (``beta > 0``) scores of the same plan. Normalisations (``docs/concepts.md`` §3.5): ``spg``
    ``−Σ_i A_i V_i / Σ_i |y_i|`` (bnpo's token mean of ``−A_i V_i / |y_i|``), ``wd1`` the mean over groups of
    the group's weighted sum, ``espo`` the mean over completions (grpo's, one value per completion).
    """
    P, A, mask = ro.prompt_len, ro.advantages, ro.completion_mask
    logp = cur.token_logp[:, P:]
    m = mask.to(logp.dtype)
    n_tok = m.sum(1)
    lower = (logp * m).sum(1)                                 # B̂_θ over the completion positions in the loss
    metrics: dict[str, float] = {}
    kl = None
    if o.loss_type == "wd1":
        loss, per_tok = wd1_loss(logp, A, mask, o.num_generations, o.loss_args["wd1_psi"])
        guard.components.record({"grpo/policy": per_tok, "grpo/logp": logp, "grpo/advantages": A[:, None]},
                                where=mask)
        return loss, metrics
    if o.loss_type == "spg":
        plan = cur.plan
        N, V = plan.batch_size, plan.num_rows // plan.batch_size     # rows of completion i: i·V … i·V + V − 1
        upper = spg_upper_bound(cur.position_logp.view(N, V, -1)[:, :, P:], plan.coef.view(N, V, -1)[:, :, P:],
                                mask, o.loss_args["spg_beta"])
        per_seq = spg_objective(lower, upper, A, o.loss_args["spg_omega"]) / n_tok.clamp_min(1)
        metrics = spg_metrics(lower.detach(), upper.detach(), A, n_tok)
        per_tok = per_seq[:, None]
        loss = aggregate(per_tok, mask, "bnpo", o.gen_length)  # Σ_i |y_i|·(−A_i V_i/|y_i|) / Σ_i |y_i|
    else:                                                     # espo
        old, ref = ro.old[k], ro.ref[k]
        eps_hi = o.epsilon if o.epsilon_high is None else o.epsilon_high
        old_seq = lower.detach() if old is None else (old.token_logp[:, P:] * m).sum(1)   # ρ = 1 at k = 0
        per_seq, log_ratio = espo_objective(lower - old_seq, n_tok, A, o.epsilon, eps_hi)
        if ref is not None:
            kl = k2_kl(lower, (ref.token_logp[:, P:] * m).sum(1), n_tok)[:, None]
            per_seq = per_seq + o.beta * kl[:, 0]
        per_tok = per_seq[:, None]
        loss = aggregate(per_tok, mask, "grpo", o.gen_length)  # (1/N) Σ_i ℓ_i
        metrics = policy_metrics("grpo", log_ratio[:, None], A[:, None], mask, eps_low=o.epsilon, eps_high=eps_hi,
                                 kl=kl, token_level=False)
    guard.components.record({"grpo/policy": per_tok, "grpo/logp": logp, "grpo/advantages": A[:, None]}, where=mask)
    if kl is not None:
        guard.components.record({"grpo/kl": kl}, where=mask)
    return loss, metrics
