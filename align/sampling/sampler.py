"""Batched denoising rollouts for masked diffusion language models (``docs/concepts.md`` §5).

:func:`generate` is LLaDA's semi-autoregressive sampler, rebuilt for throughput: logits are
computed only at positions that can be committed in the current step (the current block's
masked positions: hidden states once, output head on the gathered positions), the token choice and
its confidence come from one fused pass over the vocabulary (:mod:`align.kernels.sampling_step`),
the per-row top-k is a batched rank, and rows that have nothing left to decode drop out of the
network's batch. Exact mode (``cache=None, threshold=None``) commits the same tokens as LLaDA's
reference at ``T = 0`` (see :mod:`align.sampling.reference`); threshold decoding and the block KV
caches trade exactness for speed. See ``docs/sampling.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from align.kernels.sampling_step import BACKENDS
from align.sampling.forward import BlockForward
from align.sampling.select import (
    CONFIDENCE_OF_REMASKING,
    completion_lengths,
    finish_rows,
    score_positions,
    select_transfer,
    transfer_counts,
)

__all__ = ["BACKENDS", "GenerationOutput", "Remask", "SamplerState", "SamplingConfigError", "generate"]

REMASKING = tuple(CONFIDENCE_OF_REMASKING)
CACHE_MODES = (None, "prefix", "dual")
EOS_POLICIES = ("none", "stop")


class SamplingConfigError(ValueError):
    """Invalid arguments to :func:`generate` (the message names the argument and what was expected)."""


@dataclass
class GenerationOutput:
    """Result of :func:`generate` for ``R = batch · num_generations`` rows.

    Attributes:
        sequences: ``[R, P + L]`` prompt (left padding kept) followed by the completion.
        completion_ids: ``[R, L]`` the generated region ``sequences[:, P:]``.
        completion_lengths: ``[R]`` number of tokens before the first stop token (EOS/EOT), ``L`` if none.
        finished: ``[R]`` whether the completion contains a stop token.
        commit_step: ``[R, L]`` the denoising step (``0 ≤ s < nfe``) at which each generated position
            received its final token.
        nfe: number of network evaluations (one batched forward per denoising step; under
            classifier-free guidance that batch holds the conditional and unconditional rows).
        prompt_length: ``P``.
        attention_mask: ``[R, P + L]`` mask of ``sequences`` (1 = real token), or ``None``.
    """

    sequences: torch.Tensor
    completion_ids: torch.Tensor
    completion_lengths: torch.Tensor
    finished: torch.Tensor
    commit_step: torch.Tensor
    nfe: int
    prompt_length: int
    attention_mask: torch.Tensor | None


@dataclass
class SamplerState:
    """What an ``on_commit`` hook sees after each denoising step (tensors are live; do not modify).

    Attributes:
        sequences: ``[R, P + L]`` current tokens (``mask_id`` where still masked).
        commit_step: ``[R, L]`` step of commitment so far (``-1`` = still masked).
        committed: ``[R, L]`` positions committed at this step.
        step: index of the step just taken; block: index of the current block.
        block_start, block_end: the current block as positions of the generated region ``[0, L)``.
        prompt_length: ``P``; mask_id: the mask token ``M``.
    """

    sequences: torch.Tensor
    commit_step: torch.Tensor
    committed: torch.Tensor
    step: int
    block: int
    block_start: int
    block_end: int
    prompt_length: int
    mask_id: int


@dataclass
class Remask:
    """What an ``on_commit`` hook may return instead of a bare bool tensor.

    Attributes:
        positions: ``[R, L]`` bool, positions of the current block to remask.
        penalty: ``λ ≥ 0``; until a remasked position is committed again, the logit of the token it held is
            lowered by ``λ`` there (``logit_v − λ·[v = old token]``), so the sampler is steered away from the
            candidate that was rejected. ``0`` only remasks.
    """

    positions: torch.Tensor
    penalty: float = 0.0


OnCommit = Callable[[SamplerState], "torch.Tensor | Remask | None"]


def _validate(model, prompt_ids, attention_mask, gen_length, steps, block_length, temperature, remasking,
              cfg_scale, threshold, cache, eos_policy, num_generations, backend) -> None:
    def bad(msg: str) -> SamplingConfigError:
        return SamplingConfigError(msg)

    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.is_floating_point():
        got = getattr(prompt_ids, "shape", type(prompt_ids).__name__)
        raise bad(f"prompt_ids must be an integer tensor [batch, prompt_len], got {got}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(prompt_ids.shape):
            raise bad(f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids {tuple(prompt_ids.shape)}")
        am = attention_mask.long()
        if ((am != 0) & (am != 1)).any():
            raise bad("attention_mask must contain only 0 and 1")
        if (am[:, 1:] < am[:, :-1]).any():
            raise bad("attention_mask must be left padded (zeros before the prompt, ones after)")
    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length),
                        ("num_generations", num_generations)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise bad(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise bad(f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={num_blocks}")
    if not temperature >= 0:
        raise bad(f"temperature must be >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise bad(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if not cfg_scale >= 0:
        raise bad(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    if threshold is not None and (not isinstance(threshold, (int, float)) or threshold != threshold):
        raise bad(f"threshold must be a number or None, got {threshold!r}")
    if cache not in CACHE_MODES:
        raise bad(f"cache must be None, 'prefix' or 'dual', got {cache!r}")
    if cache is not None and getattr(model, "supports_kv_context", True) is False:
        raise bad(f"cache={cache!r} needs a model with KV-context support; use cache=None")
    if eos_policy not in EOS_POLICIES:
        raise bad(f"eos_policy must be one of {EOS_POLICIES}, got {eos_policy!r}")
    if backend not in BACKENDS:
        raise bad(f"backend must be one of {BACKENDS}, got {backend!r}")


def _token_id(value, name: str, vocab_size: int) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise SamplingConfigError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    threshold: float | None = None,
    cache: str | None = None,
    mask_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_token_id: int | None = None,
    eot_token_id: int | None = None,
    eos_policy: str = "none",
    num_generations: int = 1,
    generator: torch.Generator | None = None,
    on_commit: OnCommit | None = None,
    fixed: torch.Tensor | None = None,
    backend: str = "auto",
) -> GenerationOutput:
    """Denoise ``gen_length`` masked tokens after each prompt (LLaDA's semi-autoregressive sampler).

    Args:
        model: a denoiser with ``hidden_states``, ``head`` and ``mask_token_id`` (``align.models``).
            Put it in eval mode; it is called under ``torch.no_grad``.
        prompt_ids: ``[B, P]`` prompt token ids, left padded when lengths differ.
        attention_mask: ``[B, P]``, 1 = real token, 0 = left padding; ``None`` = no padding.
        gen_length: ``L``, number of generated positions (all start as the mask token ``M``).
        steps: total denoising steps, split evenly over the blocks (``steps / (L / block_length)``
            per block); must be a multiple of the number of blocks.
        block_length: blocks are decoded left to right; ``L`` must be a multiple of it.
        temperature: ``0`` = greedy; ``T > 0`` samples ``x0`` from ``softmax(logits / T)`` by
            Gumbel-max (float64 noise in the torch path, see the kernel docs for Triton).
        remasking: how positions are ranked for commitment: ``"low_confidence"`` (probability of
            ``x0``), ``"random"``, ``"margin"`` (top-1 − top-2 probability) or ``"entropy"``
            (negative entropy); confidences use the untempered ``softmax(logits)``.
        cfg_scale: ``w`` of classifier-free guidance; ``w > 0`` adds an unconditional pass with the
            prompt masked and uses ``un + (w + 1)(cond − un)``.
        threshold: ``τ``; commit every masked position of the current block with confidence
            ``> τ`` and at least the most confident one per row per step; a block then takes as
            many steps as it needs (at most ``block_length``) and ``steps`` only fixes the block
            split. ``None`` = LLaDA's schedule: a block with ``m`` masks and ``s`` steps commits
            ``m // s`` per step, plus one in the first ``m % s`` steps.
        cache: ``None`` or ``"none"`` (exact), ``"prefix"`` or ``"dual"`` block KV caches (approximate, refreshed
            once per block; see :mod:`align.sampling.forward`).
        mask_id: the mask token ``M``; default ``model.mask_token_id``.
        logits_eos_inf: never choose EOS (its logit is set to ``−∞``).
        confidence_eos_eot_inf: give EOS/EOT zero confidence, exactly as LLaDA's reference does:
            EOS only at ``temperature = 0``, EOT at every temperature.
        eos_token_id: default ``model.config.eos_token_id``; eot_token_id: end-of-turn token,
            default ``model.config.eot_token_id`` if the config has one (LLaDA: 126348).
        eos_policy: ``"none"`` decodes all ``L`` positions (the reference's behaviour);
            ``"stop"``: a row is finished once EOS/EOT is committed with every position before it
            decoded; the rest of the row is then filled with EOS, the row leaves the batch, and
            decoding stops early once every row is finished (``nfe`` counts only steps taken).
        num_generations: ``G`` samples per prompt; rows are repeated ``G`` times in place, so output row
            ``b·G + g`` is sample ``g`` of prompt ``b`` (passing repeated prompts is equivalent).
        generator: the source of all randomness (Gumbel noise, random remasking); default: a fresh
            generator with a non-deterministic seed. Pass one for reproducible rollouts.
        on_commit: optional hook ``on_commit(state: SamplerState) -> Tensor | Remask | None`` called
            after every step (e.g. :class:`align.sampling.loop_guard.LoopGuard`). It may return a ``[R, L]`` bool
            tensor of positions to remask, or a :class:`Remask` that also down-weights the token each
            remasked position held; positions must lie in the current block; requests are honoured
            during the first ``steps_per_block − 1`` steps of a block (so every block still ends) and
            ignored for rows already finished.
        fixed: optional ``[B, L]`` (or ``[R, L]``) completion tokens given in advance (inpainting): every position
            that holds anything but ``mask_id`` starts decoded with that token and keeps it (no step commits it,
            no ``on_commit`` remask touches it, its ``commit_step`` stays −1); the sampler decodes the rest. Rows
            are repeated ``num_generations`` times like the prompts when ``fixed`` has ``B`` rows.
        backend: sampling-step backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"torch"``,
            ``"triton"``.

    Returns:
        :class:`GenerationOutput`.
    """
    cache = None if cache == "none" else cache
    _validate(model, prompt_ids, attention_mask, gen_length, steps, block_length, temperature, remasking,
              cfg_scale, threshold, cache, eos_policy, num_generations, backend)
    vocab = int(model.config.vocab_size)
    mask_id = _token_id(model.mask_token_id if mask_id is None else mask_id, "mask_id", vocab)
    eos_id = _token_id(model.config.eos_token_id if eos_token_id is None else eos_token_id, "eos_token_id", vocab)
    eot_default = getattr(model.config, "eot_token_id", None)
    eot_id = _token_id(eot_default if eot_token_id is None else eot_token_id, "eot_token_id", vocab)
    if eos_policy == "stop" and eos_id is None:
        raise SamplingConfigError("eos_policy='stop' needs an eos_token_id (none given, none in model.config)")
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    shift = int(bool(getattr(model, "shift_logits", False)))
    if shift and prompt_ids.shape[1] == 0:
        raise SamplingConfigError("a shifted-logit model needs a non-empty prompt")

    device = prompt_ids.device
    if num_generations > 1:
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(num_generations, dim=0)
    R, P = prompt_ids.shape
    L, Lb = gen_length, block_length
    x = torch.full((R, P + L), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt_ids
    given = torch.zeros(R, L, dtype=torch.bool, device=device)
    if fixed is not None:
        if fixed.shape[0] * num_generations == R and num_generations > 1:
            fixed = fixed.repeat_interleave(num_generations, dim=0)
        if tuple(fixed.shape) != (R, L) or fixed.is_floating_point():
            raise SamplingConfigError(f"fixed must be integer ids of shape {(R // num_generations, L)} or {(R, L)}, "
                                      f"got {tuple(fixed.shape)}")
        given = fixed.to(device) != mask_id
        x[:, P:] = torch.where(given, fixed.to(device), x[:, P:])
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.long(), attention_mask.new_ones(R, L).long()], dim=1)
    commit_step = torch.full((R, L), -1, dtype=torch.long, device=device)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    stop_ids = torch.tensor([t for t in (eos_id, eot_id) if t is not None], dtype=torch.long, device=device)
    forward = BlockForward(model, cache, attention_mask, P, mask_id, cfg=cfg_scale > 0, shift=shift)
    all_rows = torch.arange(R, device=device)
    steps_per_block = steps // (L // Lb)
    avoid: tuple[torch.Tensor, torch.Tensor] | None = None  # (token to down-weight [R, L] (-1 none), λ [R, L])
    step = 0
    for block in range(L // Lb):
        bs, be = P + block * Lb, P + (block + 1) * Lb  # absolute positions of the block
        j = 0  # step within the block
        while True:
            masked_all = x[:, bs:be] == mask_id
            active = masked_all.any(dim=1)
            if not active.any():
                break
            if j > steps_per_block + Lb:  # every step commits >= 1 token per active row: cannot happen
                raise RuntimeError(f"sampler made no progress in block {block} after {j} steps")
            rows = all_rows if bool(active.all()) else active.nonzero().squeeze(1)
            masked = masked_all.index_select(0, rows)
            h = forward(x, bs, be, refresh=j == 0, rows=rows)
            # logits only at the positions that can be committed: the block's masked positions
            r_idx, i_idx = masked.nonzero(as_tuple=True)
            h_uncond = h[r_idx + rows.numel(), i_idx] if cfg_scale > 0 else None
            head = model.head
            if avoid is not None:
                pos = i_idx + (bs - P)
                head = _penalised_head(model.head, avoid[0][rows[r_idx], pos], avoid[1][rows[r_idx], pos])
            x0, c = score_positions(
                head, h[r_idx, i_idx], h_uncond, cfg_scale=cfg_scale, temperature=temperature,
                remasking=remasking, generator=generator, backend=backend, logits_eos_inf=logits_eos_inf,
                confidence_eos_eot_inf=confidence_eos_eot_inf, eos_token_id=eos_id, eot_token_id=eot_id,
                mask_id=mask_id, step=step,
            )
            conf = torch.full(masked.shape, float("-inf"), device=device)
            conf[r_idx, i_idx] = c.to(conf.dtype)
            if threshold is not None:
                chosen = select_transfer(conf, masked, threshold=float(threshold))
            else:
                k = transfer_counts(masked.sum(dim=1), steps_per_block - j)
                chosen = select_transfer(conf, masked, k=k)
            cand = x[rows, bs:be]
            cand[r_idx, i_idx] = x0
            x[rows, bs:be] = torch.where(chosen, cand, x[rows, bs:be])
            block_steps = commit_step[rows, bs - P : be - P]
            block_steps[chosen] = step
            commit_step[rows, bs - P : be - P] = block_steps
            if on_commit is not None:
                committed = torch.zeros(R, L, dtype=torch.bool, device=device)
                committed[rows, bs - P : be - P] = chosen
                state = SamplerState(x, commit_step, committed, step, block, bs - P, be - P, P, mask_id)
                remask = on_commit(state)
                if remask is not None and j < steps_per_block - 1:
                    avoid = _apply_remask(remask, x, commit_step, finished, P, bs, be, mask_id, avoid, given)
            if eos_policy == "stop":
                finished |= finish_rows(x[:, P:], commit_step, finished, stop_ids=stop_ids, fill_id=eos_id,
                                        mask_id=mask_id, step=step)
            step += 1
            j += 1
        if eos_policy == "stop" and bool(finished.all()):
            break

    gen = x[:, P:]
    if stop_ids.numel():
        lengths, ended = completion_lengths(gen, stop_ids)
    else:
        lengths = torch.full((R,), L, dtype=torch.long, device=device)
        ended = torch.zeros(R, dtype=torch.bool, device=device)
    return GenerationOutput(
        sequences=x, completion_ids=gen, completion_lengths=lengths, finished=ended, commit_step=commit_step,
        nfe=forward.nfe, prompt_length=P, attention_mask=attention_mask,
    )


def _penalised_head(head: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, penalty: torch.Tensor
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``head`` with ``λ_n`` subtracted from the logit of ``token_n`` at each scored position ``n`` (none where -1).

    Under classifier-free guidance the head sees the conditional rows then the unconditional ones; both get
    the same penalty.
    """
    hit = token >= 0
    if not bool(hit.any()):
        return head
    n_idx = hit.nonzero().squeeze(1)
    tok, lam = token[n_idx], penalty[n_idx]

    def wrapped(h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        N = token.numel()
        for off in range(0, logits.shape[0], N):
            logits[n_idx + off, tok] -= lam.to(logits.dtype)
        return logits

    return wrapped


def _apply_remask(remask, x, commit_step, finished, P: int, bs: int, be: int, mask_id: int,
                  avoid: tuple[torch.Tensor, torch.Tensor] | None, given: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Remask the positions an ``on_commit`` hook asked for (current block only; finished rows and ``given``
    positions skipped).

    Returns the down-weighting state: for a :class:`Remask` with ``penalty > 0`` the token each remasked position
    held is recorded with its ``λ``.
    """
    R, L = commit_step.shape
    penalty = 0.0
    if isinstance(remask, Remask):
        penalty = float(remask.penalty)
        if not penalty >= 0:
            raise SamplingConfigError(f"Remask.penalty must be >= 0, got {remask.penalty!r}")
        remask = remask.positions
    if not isinstance(remask, torch.Tensor) or remask.dtype != torch.bool or tuple(remask.shape) != (R, L):
        raise SamplingConfigError(f"on_commit must return None, a Remask or a bool tensor of shape {(R, L)}")
    outside = remask.clone()
    outside[:, bs - P : be - P] = False
    if outside.any():
        raise SamplingConfigError("on_commit asked to remask positions outside the current block")
    remask = remask.to(x.device) & ~finished[:, None] & ~given
    gen = x[:, P:]
    if penalty > 0 and bool(remask.any()):
        if avoid is None:
            avoid = (torch.full((R, L), -1, dtype=torch.long, device=x.device),
                     torch.zeros(R, L, dtype=torch.float32, device=x.device))
        avoid[0][remask] = gen[remask]
        avoid[1][remask] = penalty
    gen[remask] = mask_id
    commit_step[remask] = -1
    return avoid
