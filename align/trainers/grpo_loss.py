"""The policy loss of one GRPO inner iteration on one micro-batch of buffered rollouts (``docs/concepts.md`` §3).

:func:`policy_loss` scores iteration ``k``'s mask plan under the current policy (with gradients) and combines
it with the buffered old and reference scores into ``loss_type``'s objective, its KL term and its
normalisation (:mod:`align.trainers.grpo_math`).
"""

from __future__ import annotations

from typing import Any

import torch

from align.likelihood import score_plan
from align.trainers.grpo_config import GRPOOptions
from align.trainers.grpo_math import aggregate, k3_kl, policy_objective
from align.trainers.grpo_metrics import policy_metrics


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
