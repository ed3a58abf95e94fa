"""Per-step pieces of the sampler: scoring candidate tokens, choosing what to commit, EOS handling.

All functions are batched over rows (no per-row Python loops). Symbols follow ``docs/concepts.md`` §5:
``x0`` is the candidate token at a masked position, ``c`` its confidence, ``k`` the number of
positions committed in a row at this step, ``τ`` the confidence threshold.
"""

from __future__ import annotations

import torch

from align.kernels.sampling_step import sample_step

#: remasking strategy -> confidence score computed by the fused sampling step.
CONFIDENCE_OF_REMASKING = {"low_confidence": "prob", "random": "prob", "margin": "margin", "entropy": "entropy"}


class NonFiniteLogitsError(RuntimeError):
    """The model returned NaN or infinite logits at positions the sampler was to decode.

    Without this check a row of NaN logits would be decoded as token 0 (``argmax`` takes the first NaN) with a
    NaN confidence, and the rollout would go on silently.
    """


def check_logits(logits: torch.Tensor, step: int | None = None) -> None:
    """Raise :class:`NonFiniteLogitsError` when ``logits`` ``[N, V]`` hold a NaN or ``+inf``, or a row is all ``-inf``.

    The common case costs one reduction: the sum of the logits is finite exactly when none is NaN or infinite (a
    sum of float32 logits does not overflow). ``-inf`` at some tokens of a row is allowed (the row still has a
    finite maximum); only then are the rows inspected one by one.
    """
    if bool(torch.isfinite(logits.sum())):
        return
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1) | torch.isneginf(logits).all(dim=-1)
    if not bool(bad.any()):
        return
    nan_rows = int(torch.isnan(logits).any(dim=-1).sum())
    at = "" if step is None else f"denoising step {step}: "
    raise NonFiniteLogitsError(
        f"{at}the model's logits are not finite at {int(bad.sum())} of {logits.shape[0]} positions being decoded "
        f"({nan_rows} with NaN); they would decode as token 0. Check the weights for NaN/inf (a diverged or "
        "damaged checkpoint) and the dtype (float16 overflows: use bfloat16 or float32)")


def score_positions(
    head,
    h_cond: torch.Tensor,
    h_uncond: torch.Tensor | None,
    *,
    cfg_scale: float,
    temperature: float,
    remasking: str,
    generator: torch.Generator,
    backend: str,
    logits_eos_inf: bool,
    confidence_eos_eot_inf: bool,
    eos_token_id: int | None,
    eot_token_id: int | None,
    mask_id: int,
    step: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens ``x0`` and confidences ``c`` for ``N`` masked positions.

    Args:
        head: the model's output head, ``[N, d] -> [N, V]``.
        h_cond: hidden states ``[N, d]`` of the conditional pass at the positions.
        h_uncond: same positions in the unconditional pass (CFG), or ``None``.
        cfg_scale: ``w``; logits ``= un + (w + 1)(cond − un)`` when ``w > 0``.
        temperature, remasking, generator, backend: see :func:`align.sampling.generate`.
        logits_eos_inf: set the EOS logit to ``−∞`` before sampling.
        confidence_eos_eot_inf: LLaDA's confidence suppression, including its quirk: at ``T = 0``
            the confidence is computed with both EOS and EOT logits at ``−∞``; at ``T > 0`` only EOT
            is suppressed (the reference writes EOS into a noisy copy that is no longer read).
            ``x0`` itself is chosen before the suppression. Ignored by ``random`` remasking.
        mask_id: the mask token is never chosen as ``x0`` (committing it would leave the position
            masked); it still counts in the confidence's normalisation, as in the reference.
        step: the denoising step, named by :class:`NonFiniteLogitsError` when the logits are not finite (checked
            before either backend of the sampling step runs).
    """
    if h_uncond is not None:
        both = head(torch.cat([h_cond, h_uncond])).float()
        cond, un = both.chunk(2)
        logits = un + (cfg_scale + 1.0) * (cond - un)  # CFG: un + (w+1)(cond − un)
    else:
        logits = head(h_cond).float()
    check_logits(logits, step)
    if logits_eos_inf and eos_token_id is not None:
        logits[:, eos_token_id] = float("-inf")
    kind = CONFIDENCE_OF_REMASKING[remasking]
    x0, c = sample_step(logits, temperature=temperature, generator=generator, confidence=kind,
                        exclude_token=mask_id, backend=backend)
    if remasking == "random":
        # uniform random confidence: committing the top-k is a uniformly random subset
        c = torch.rand(x0.shape, generator=generator, device=generator.device).to(x0.device)
        return x0, c
    if confidence_eos_eot_inf:
        suppressed = [eot_token_id] + ([eos_token_id] if temperature == 0 else [])
        suppressed = [t for t in suppressed if t is not None]
        if suppressed:
            masked_logits = logits.clone()
            masked_logits[:, suppressed] = float("-inf")
            if kind == "prob":
                lse = torch.logsumexp(masked_logits, dim=-1)
                c = torch.exp(masked_logits.gather(-1, x0[:, None]).squeeze(-1) - lse)
            else:
                c = sample_step(masked_logits, temperature=0.0, confidence=kind, backend=backend).confidence
    return x0, c


def transfer_counts(num_masked: torch.Tensor, steps_left: int) -> torch.Tensor:
    """Tokens to commit now: ``k = ⌈m_rem / s_rem⌉``.

    Applied at every step this reproduces LLaDA's schedule for a block with ``m`` masks and ``s``
    steps (``m // s`` per step, one more in the first ``m % s`` steps), and adapts when positions
    are filled or remasked in between.
    """
    s = max(int(steps_left), 1)
    return torch.div(num_masked + s - 1, s, rounding_mode="floor")


def select_transfer(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    k: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Positions to commit, ``[rows, block]`` bool.

    ``confidence`` is ``−∞`` outside ``masked``. With ``threshold=τ``: every masked position with
    ``c > τ`` plus, in every row that still has masks, its most confident one (Fast-dLLM).
    Otherwise the ``k[row]`` most confident masked positions (ties: lower position first).
    """
    has_mask = masked.any(dim=1)
    if threshold is not None:
        chosen = masked & (confidence > threshold)
        rows = has_mask.nonzero().squeeze(1)
        chosen[rows, confidence[rows].argmax(dim=1)] = True
        return chosen
    order = torch.sort(confidence, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return masked & (rank < k[:, None])


def first_index(flags: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True in each row of ``flags`` (``default`` where there is none)."""
    idx = flags.int().argmax(dim=1)
    return torch.where(flags.any(dim=1), idx, torch.full_like(idx, default))


def finish_rows(
    gen: torch.Tensor,
    commit_step: torch.Tensor,
    finished: torch.Tensor,
    *,
    stop_ids: torch.Tensor,
    fill_id: int,
    mask_id: int,
    step: int,
) -> torch.Tensor:
    """EOS policy ``"stop"``: detect rows that just finished and fill them, in place.

    A row is finished once a stop token (EOS/EOT) is committed and every position before it is
    decoded. Everything after its first stop token becomes ``fill_id`` (EOS); positions whose token
    changes this way (masks included) get ``commit_step = step``. Returns the rows newly finished.

    Args:
        gen: ``[R, L]`` generated region (a view into the sequences; modified in place).
        commit_step: ``[R, L]`` (modified in place).
        finished: ``[R]`` rows already finished.
    """
    L = gen.shape[1]
    first_stop = first_index(torch.isin(gen, stop_ids), L)
    first_mask = first_index(gen == mask_id, L)
    newly = (first_stop < first_mask) & ~finished
    if newly.any():
        after = torch.arange(L, device=gen.device)[None, :] > first_stop[:, None]
        change = after & newly[:, None] & (gen != fill_id)
        gen[change] = fill_id
        commit_step[change] = step
    return newly


def completion_lengths(gen: torch.Tensor, stop_ids: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``gen`` ``[R, L]``: the number of tokens before the first stop token (``L`` when there is
    none), and whether a stop token occurs."""
    stops = torch.as_tensor(stop_ids, dtype=gen.dtype, device=gen.device)
    is_stop = torch.isin(gen, stops)
    return first_index(is_stop, gen.shape[1]), is_stop.any(dim=1)
