"""Diffusion-LM policy objectives beside TRL's loss types (``docs/concepts.md`` §3.5, ``docs/grpo.md`` "Objectives").

Symbols as in ``docs/concepts.md``: completion ``i`` of a micro-batch of ``N`` (groups of ``G``), advantage ``A_i``,
completion mask ``m_ik`` and ``|y_i| = Σ_k m_ik``; a mask plan with ``V`` rows per completion, ``coef[r, k]`` and
``f_r,k = f_θ(y_k | x, z_r)_k`` (``position_logp`` holds ``log f``); ``B̂_i = Σ_r Σ_k coef[r, k] log f_r,k``.

* **SPG** — Sandwiched Policy Gradient (Wang et al., 2025, arXiv:2510.09541): a lower bound (the ELBO) for
  completions with ``A_i > 0``, an upper bound (EUBO) mixed with the lower one for the others
  (:func:`spg_upper_bound`, :func:`spg_objective`).
* **wd1** — weighted policy optimisation (Tang et al., 2025, arXiv:2507.08838): a ratio-free, advantage-weighted
  log-likelihood (:func:`wd1_weights`, :func:`wd1_loss`).
* **ESPO** — ELBO-based Sequence-level Policy Optimization (Ou et al., 2025, arXiv:2512.03759): a clipped
  sequence-level ratio of ELBOs, normalised per token, with a quadratic (k2) KL (:func:`espo_objective`,
  :func:`k2_kl`).

The plumbing (which scores, which normalisation, the metrics) is :func:`align.trainers.grpo_loss.policy_loss`.
"""

from __future__ import annotations

import torch


def spg_upper_bound(position_logp: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor, beta: float
                    ) -> torch.Tensor:
    """SPG's evidence upper bound ``Û_i`` of each completion, ``[N]``, from the per-row scores of one plan.

    SPG (arXiv:2510.09541, §3; their code's per-token form), for ``β ≥ 1``::

        u_ik = (1/β) · log Σ_r coef[r, k] · f_r,k^β             (k ∈ S_i: positions some row scores)
        Û_i  = |y_i| / |S_i| · Σ_{k ∈ S_i} u_ik                 (0 when S_i is empty)

    With ``coef = 1/(n·t_r)`` (the ``block`` and t- / l-sampled ``elbo`` plans), the inner sum is the Monte Carlo
    mean of ``(1/t)·1[z_k = M]·f^β``, whose expectation is what the paper's bound is stated on. The log is taken
    of the sample mean, so for one draw of the plan ``Û`` can fall below ``B̂`` (a token masked by one row of
    ``n`` with ``t ≈ 1`` gets ``log f − (1/β)·log n``); for a single row, ``Û − B̂ = |y|·(1/β)·log(1/t) ≥ 0``.

    Args:
        position_logp: ``[N, V, L]`` ``log f_r,k`` (rows of completion ``i`` on the second axis).
        coef: ``[N, V, L]`` the plan's coefficients; a position counts in row ``r`` where ``coef > 0``.
        mask: ``[N, L]`` completion positions in the loss.
        beta: ``β`` of the bound (``spg_beta``).
    """
    counts = (coef > 0) & mask[:, None, :].bool()
    seen = counts.any(dim=1)                                                    # k ∈ S_i
    # log(coef · f^β) where a row counts; unseen positions get a finite dummy that is masked out below
    terms = torch.where(counts, torch.log(coef.clamp_min(1e-30)) + beta * position_logp,
                        torch.full_like(position_logp, -torch.inf))
    terms = torch.where(seen[:, None, :], terms, torch.zeros_like(terms))
    u = torch.where(seen, torch.logsumexp(terms, dim=1) / beta, torch.zeros_like(seen, dtype=terms.dtype))
    n_tok = mask.sum(dim=1).to(u.dtype)
    return u.sum(dim=1) * n_tok / seen.sum(dim=1).clamp_min(1).to(u.dtype)     # |y| × mean over S_i


def spg_objective(lower: torch.Tensor, upper: torch.Tensor, A: torch.Tensor, omega: float) -> torch.Tensor:
    """SPG's per-completion objective ``−A_i · V_i`` (``[N]``), to be normalised by ``Σ_i |y_i|``.

    SPG (arXiv:2510.09541, §3, its mixture for negative advantages)::

        V_i = B̂_i                          if A_i > 0   (maximise the lower bound)
            = ω · Û_i + (1 − ω) · B̂_i       otherwise    (push down an upper bound; ω < 1 against collapse)

    ``lower`` = ``B̂``, ``upper`` = ``Û`` (:func:`spg_upper_bound`), ``omega`` = ``ω`` (``spg_omega``).
    """
    value = torch.where(A > 0, lower, omega * upper + (1 - omega) * lower)
    return -A * value


def wd1_weights(A: torch.Tensor, G: int, psi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """wd1's positive and negative weights ``(w⁺, w⁻)``, each ``[N]``, over groups of ``G`` completions.

    wd1 (arXiv:2507.08838), within each group ``g``::

        w⁺_i = exp(ψ A_i) / Σ_{j ∈ g, A_j ≠ 0} exp(ψ A_j)        w⁻_i = exp(−ψ A_i) / Σ_{j ∈ g, A_j ≠ 0} exp(−ψ A_j)

    Completions with ``A_i = 0`` (a skipped reward, or a group whose rewards are all equal) get weight 0 in
    both and stay out of the sums, so a group without signal adds nothing.
    """
    if A.dim() != 1 or A.numel() % G:
        raise ValueError(f"advantages must be [N] with N a multiple of G={G}, got {tuple(A.shape)}")
    a = A.view(-1, G)
    active = a != 0

    def softmax(x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(torch.where(active, x, torch.full_like(x, -torch.inf)), dim=1)
        return torch.where(active, w, torch.zeros_like(w)).view(-1)     # an all-zero group gives 0, not NaN

    return softmax(psi * a), softmax(-psi * a)


def wd1_loss(logp: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, G: int, psi: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """wd1's loss on one micro-batch and its per-token terms ``[N, L]``.

    wd1 (arXiv:2507.08838; one likelihood pass, no old policy, no ratio)::

        loss = −(G/N) · Σ_i (w⁺_i − w⁻_i) · Σ_k m_ik · log π̂_θ(y_ik)

    the weighted log-likelihood summed over each completion's tokens and over the group, averaged over the
    ``N/G`` groups. ``logp`` is the estimator's per-token ``log π̂_θ`` (``token_logp``) and the weights are
    :func:`wd1_weights` (no gradient: they depend on the rewards only).
    """
    w_pos, w_neg = wd1_weights(A, G, psi)
    per_tok = -(w_pos - w_neg).to(logp.dtype)[:, None] * logp
    groups = A.numel() // G
    return (per_tok * mask.to(logp.dtype)).sum() / groups, per_tok


def espo_objective(log_ratio: torch.Tensor, n_tok: torch.Tensor, A: torch.Tensor, eps_low: float, eps_high: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """ESPO's clipped sequence-level surrogate, ``[N]``, and the per-token-normalised log-ratio it clips.

    ESPO (arXiv:2512.03759), with the ELBO ``B̂`` as the sequence log-likelihood::

        ρ_i = exp((B̂_θ(y_i) − B̂_old(y_i)) / |y_i|)
        ℓ_i = −min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε_high) A_i)

    ``log_ratio`` is ``B̂_θ − B̂_old`` per completion, ``n_tok`` is ``|y_i|``.
    """
    normalised = log_ratio / n_tok.clamp_min(1).to(log_ratio.dtype)
    rho = torch.exp(normalised)
    return -torch.minimum(rho * A, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * A), normalised


def k2_kl(seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, n_tok: torch.Tensor) -> torch.Tensor:
    """ESPO's KL term per completion, ``[N]``: the k2 estimator of the sequence ELBOs, divided by ``|y_i|``.

    ESPO (arXiv:2512.03759; k2 is "robust" where k3's ``exp`` of a sequence-level difference explodes)::

        KL_i = ½ · (B̂_θ(y_i) − B̂_ref(y_i))² / |y_i|
    """
    return 0.5 * (seq_logp - ref_seq_logp) ** 2 / n_tok.clamp_min(1).to(seq_logp.dtype)
