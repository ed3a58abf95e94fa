"""The metrics the diffusion GRPO trainer logs, under TRL's names where the meaning is the same.

:func:`rollout_metrics` is computed once per batch of rollouts (rewards, advantages, completion lengths) and
:func:`policy_metrics` once per inner iteration (KL, clipped shares). Every name is listed in ``docs/grpo.md``.
Values are computed on each process's own micro-batches; at each logging step the trainer gathers every
process's values and logs their mean over the logging window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from align.trainers.grpo_math import CLIPPED_LOSS_TYPES, clip_regions, constant_groups, vespo_weights


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of the non-NaN values of ``x`` (NaN, 0 when too few)."""
    ok = x[~torch.isnan(x)].float()
    return (ok.mean().item() if ok.numel() else float("nan")), (ok.std().item() if ok.numel() > 1 else 0.0)


def window_means(metrics: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each metric's values over a logging window, NaNs (no value that step) left out; a metric with no
    number in the window is left out too. Shared by the GRPO and VRPO trainers' ``log``."""
    out = {}
    for key, vals in metrics.items():
        finite = [v for v in vals if v == v]
        if finite:
            out[key] = sum(finite) / len(finite)
    return out


def rollout_metrics(names: tuple[str, ...], per_function: torch.Tensor, total: torch.Tensor, advantages: torch.Tensor,
                    lengths: torch.Tensor, has_stop: torch.Tensor, num_generations: int) -> dict[str, float]:
    """Metrics of one batch of rollouts.

    Args:
        names: reward function names (columns of ``per_function``).
        per_function: ``[N, F]`` rewards (NaN where a function skipped a sample).
        total: ``[N]`` weighted total reward.
        advantages: ``[N]`` advantages.
        lengths: ``[N]`` tokens before each completion's first stop (``gen_length`` when there is none).
        has_stop: ``[N]`` whether the completion has a stop token.
        num_generations: completions per prompt (the group size).

    TRL's names: ``rewards/<name>/mean|std``, ``reward``, ``reward_std``, ``frac_reward_zero_std``,
    ``completions/{mean,min,max}_length`` (``len(completion_ids)``: the tokens up to and including the first
    stop), ``completions/{mean,min,max}_terminated_length`` (the same over completions that stopped; 0 when
    none did) and ``completions/clipped_ratio`` (share with no stop). dlm-align's own:
    ``advantages/mean|std|abs_max``.
    """
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"] = _mean_std(per_function[:, j])
    out["reward"], out["reward_std"] = _mean_std(total)
    out["frac_reward_zero_std"] = constant_groups(total.float(), num_generations).float().mean().item()
    A = advantages.float()
    out["advantages/mean"] = A.mean().item()
    out["advantages/std"] = A.std().item() if A.numel() > 1 else 0.0
    out["advantages/abs_max"] = A.abs().max().item()
    n_ids = (lengths.cpu() + has_stop.cpu().to(lengths.dtype)).float()
    stopped = has_stop.cpu()
    term = n_ids[stopped] if bool(stopped.any()) else torch.zeros(1)
    for infix, x in (("", n_ids), ("terminated_", term)):
        out[f"completions/mean_{infix}length"] = x.mean().item()
        out[f"completions/min_{infix}length"] = x.min().item()
        out[f"completions/max_{infix}length"] = x.max().item()
    out["completions/clipped_ratio"] = 1.0 - stopped.float().mean().item()
    return out


def _per_completion(x: torch.Tensor, mask: torch.Tensor, token_level: bool,
                    reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``reduce`` (min or max) over completions of each one's masked mean of ``x``; completions with an empty
    mask are left out (NaN when none is left)."""
    per = (x * mask).sum(1) / mask.sum(1) if token_level else x.float().squeeze(1)
    per = per[~torch.isnan(per)]
    return reduce(per).item() if per.numel() else float("nan")


def policy_metrics(loss_type: str, log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   eps_low: float, eps_high: float, kl: torch.Tensor | None = None,
                   token_level: bool = True, loss_args: dict[str, float] | None = None) -> dict[str, float]:
    """Metrics of one inner iteration's loss.

    Args:
        loss_type: the objective (:data:`~align.trainers.grpo_math.LOSS_TYPES`).
        log_ratio: ``log π̂_θ − log π̂_old``, ``[N, L]`` per token or ``[N, 1]`` per completion.
        advantages: ``[N, 1]``.
        mask: ``[N, L]`` completion positions in the loss.
        eps_low, eps_high: the clip range.
        kl: the k3 KL term, shaped like ``log_ratio`` (None without a reference).
        token_level: ``importance_sampling_level`` is ``token`` (else ``log_ratio`` and ``kl`` are ``[N, 1]``).
        loss_args: ``vespo``'s ``k`` and ``λ`` (:attr:`~align.trainers.grpo_config.GRPOOptions.loss_args`).

    Means are TRL's: over the masked tokens (token level) or over completions (sequence level).
    ``clip_ratio/low_mean`` is the share with ``ρ < 1 − ε`` and ``A < 0``, ``clip_ratio/high_mean`` with
    ``ρ > 1 + ε_high`` and ``A > 0``, ``clip_ratio/region_mean`` either (where the clipped term is the active
    one); ``clip_ratio/low_min`` and ``clip_ratio/high_max`` are the smallest and largest per-completion shares.
    ``cispo`` logs ``cispo_clip_ratio`` (``ρ > ε_high`` and ``A > 0``) instead, ``vespo``
    ``vespo/phi_seq_mean`` (the mean sequence weight ``φ``), ``sapo`` none of these.
    """
    m = mask.to(torch.float32)

    def mean(x: torch.Tensor) -> float:
        if not token_level:
            return x.float().mean().item()
        return ((x * m).sum() / m.sum().clamp_min(1)).item()

    out: dict[str, float] = {}
    if kl is not None:
        out["kl"] = mean(kl.detach())
    ratio = log_ratio.detach()
    if loss_type in CLIPPED_LOSS_TYPES:
        low, high = clip_regions(ratio, advantages, eps_low, eps_high)
        out["clip_ratio/low_mean"] = mean(low)
        out["clip_ratio/high_mean"] = mean(high)
        out["clip_ratio/region_mean"] = mean(low | high)
        out["clip_ratio/low_min"] = _per_completion(low, m, token_level, torch.min)
        out["clip_ratio/high_max"] = _per_completion(high, m, token_level, torch.max)
    elif loss_type == "cispo":
        out["cispo_clip_ratio"] = mean((torch.exp(ratio) > eps_high) & (advantages > 0))
    elif loss_type == "vespo":
        args = {k.removeprefix("vespo_"): v for k, v in (loss_args or {}).items()}
        out["vespo/phi_seq_mean"] = vespo_weights(ratio, advantages, m, **args).mean().item()
    return out


def spg_metrics(lower: torch.Tensor, upper: torch.Tensor, advantages: torch.Tensor, n_tok: torch.Tensor
                ) -> dict[str, float]:
    """``spg/bound_gap``: the mean per-token gap ``(Û_i − B̂_i) / |y_i|`` between SPG's upper and lower bounds
    over the completions with ``A_i < 0`` (the ones the upper bound is used for); NaN when there are none.

    Args:
        lower, upper: ``[N]`` ``B̂`` and ``Û`` (:func:`align.trainers.objectives.spg_upper_bound`).
        advantages: ``[N]``.
        n_tok: ``[N]`` completion positions in the loss.
    """
    neg = (advantages < 0) & (n_tok > 0)
    gap = (upper - lower)[neg] / n_tok[neg]
    return {"spg/bound_gap": gap.float().mean().item() if gap.numel() else float("nan")}
