"""One batch of GRPO rollouts: sample ``G`` completions per prompt, decode them and score them with the rewards.

:func:`sample_and_score` is what the trainer runs for a micro-batch (and again, with hints fixed in place, for the
groups :mod:`align.trainers.hints` helps); :func:`completion_loss_mask` says which completion positions the
likelihood scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.data.formatting import is_conversational
from align.sampling import completion_lengths


@dataclass(frozen=True)
class Sampled:
    """One batch of rollouts after decoding and scoring (``N`` completions, ``L`` = ``gen_length``)."""

    sequences: torch.Tensor      # [N, P + L] prompt + completion
    commit_step: torch.Tensor    # [N, L] step at which each position was decoded (−1: given, never decoded)
    given: torch.Tensor          # [N, L] bool: positions fixed in advance (hints)
    lengths: torch.Tensor        # [N] tokens before the first stop
    texts: list[str]             # decoded completions (up to the first stop)
    comp_ids: list[list[int]]    # completion ids up to and including the first stop
    per_function: torch.Tensor   # [N, F] rewards
    total: torch.Tensor          # [N] weighted total
    names: tuple[str, ...]       # reward function names


def sample_and_score(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, rows: list[dict[str, Any]],
                     G: int, *, generate_kwargs: dict[str, Any], stop_ids: list[int], tokenizer: Any,
                     reward_runner: Any, generator: torch.Generator, on_commit: Any = None,
                     fixed: torch.Tensor | None = None) -> Sampled:
    """Sample the completions of ``ids`` (prompts already repeated ``G`` times), decode and score them.

    Rewards get TRL's forms: the dataset's prompts (string or messages), completions as text or as
    ``[{"role": "assistant", "content": text}]`` for conversational prompts, the completion ids up to the first
    stop, and every other column of the rows. ``fixed`` (``[N, L]``, ``mask_id`` where free) is passed to the sampler
    (hints).
    """
    from align.sampling import generate

    out = generate(model, ids, attention_mask=att, **generate_kwargs, generator=generator, on_commit=on_commit,
                   fixed=fixed)
    P, L = ids.shape[1], generate_kwargs["gen_length"]
    comp = out.sequences[:, P:]
    lengths = completion_lengths(comp, stop_ids)[0]                  # tokens before the first stop
    has_stop = lengths < L
    texts = [tokenizer.decode(comp[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(len(comp))]
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
    comp_ids = [comp[i, : int(lengths[i]) + int(has_stop[i])].tolist() for i in range(len(comp))]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0]) else texts
    scored = reward_runner(prompts, completions, comp_ids, **columns)
    mask_id = int(model.mask_token_id)
    given = torch.zeros_like(comp, dtype=torch.bool) if fixed is None else fixed.to(comp.device) != mask_id
    return Sampled(out.sequences, out.commit_step, given, lengths, texts, comp_ids, scored.per_function,
                   scored.total, tuple(scored.names))


def completion_loss_mask(lengths: torch.Tensor, L: int, *, eos_fill_in_loss: bool = True,
                         mask_truncated: bool = False) -> torch.Tensor:
    """``[N, L]`` completion positions scored by the likelihood, from the tokens before each first stop.

    ``eos_fill_in_loss``: every generated position, the EOS fill after the first stop included; otherwise the
    positions up to and including the first stop. ``mask_truncated``: rows with no stop (``length == L``) count
    nowhere.
    """
    if eos_fill_in_loss:
        mask = torch.ones(len(lengths), L, dtype=torch.bool, device=lengths.device)
    else:
        mask = torch.arange(L, device=lengths.device)[None] < (lengths + 1).clamp(max=L)[:, None]
    if mask_truncated:
        mask &= (lengths < L)[:, None]
    return mask
