"""IGPO-style hints: inpaint part of a reference solution into rollouts of groups that got every completion wrong.

When every completion of a group is wrong, the group's rewards are equal, its advantages are 0 and it teaches
nothing. A masked diffusion model can be given any positions of its output in advance (inpainting,
:func:`align.sampling.generate`'s ``fixed``), so such a group can be sampled again with a few chunks of a
reference solution fixed in place: the model writes the rest, and some of these hinted completions come out
right. Following IGPO (Zhao et al., 2025, "Inpainting-Guided Policy Optimization for Diffusion Large Language
Models", arXiv:2509.10396):

1. a group is *all wrong* when the reward ``hint_reward`` is ``<= 0`` for each of its ``G`` completions;
2. for each such group a share ``η ~ U(hint_ratio)`` of the reference solution's tokens (the ``hint_column`` of
   the row, tokenized without special tokens, cut to ``gen_length``) is fixed at its own positions, in chunks of
   random length (:func:`hint_ids`), and ``G`` completions are sampled again around them and scored;
3. up to ``⌊hint_replace · G⌋`` (at least 1) of the hinted completions that ``hint_reward`` scores ``> 0`` replace
   as many of the group's original completions; the group now has reward variance and non-zero advantages.

The hint tokens are not the policy's own samples: they stay in the sequence as context but are left out of the
completion positions the likelihood scores (:func:`splice` returns their mask), so the update reinforces the
tokens the model wrote around them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from align.trainers.grpo_rollout import Sampled


def all_wrong_groups(s: Sampled, reward: str, G: int) -> torch.Tensor:
    """``[N/G]`` bool: groups whose every completion has ``reward <= 0`` (NaN, a skipped reward, counts as wrong)."""
    if reward not in s.names:
        raise ValueError(f"hint_reward {reward!r} is not one of the stage's rewards {list(s.names)}")
    r = s.per_function[:, s.names.index(reward)].float().view(-1, G)
    return ~(r > 0).any(dim=1)


def hint_ids(references: list[list[int]], L: int, mask_id: int, ratio: tuple[float, float],
             generator: torch.Generator) -> torch.Tensor:
    """``[n, L]`` ids with ``mask_id`` where the model writes and a reference token where a hint is fixed.

    For each reference ``y*`` (token ids, cut to ``L``): ``η ~ U(ratio)``, then ``y*`` is cut into consecutive chunks
    of ``1 … max(1, |y*|/4)`` tokens (uniform) and chunks are drawn in random order until ``⌈η·|y*|⌉`` tokens
    are fixed (the last chunk may take the count past it).
    """
    out = torch.full((len(references), L), mask_id, dtype=torch.long)
    lo, hi = ratio
    for i, ref in enumerate(references):
        ref = ref[:L]
        n = len(ref)
        if n == 0:
            continue
        eta = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
        target = int(torch.ceil(torch.tensor(eta * n)).item())
        longest = max(1, n // 4)
        chunks, start = [], 0
        while start < n:
            size = 1 + int(torch.randint(longest, (), generator=generator))
            chunks.append((start, min(n, start + size)))
            start += size
        fixed = 0
        for j in torch.randperm(len(chunks), generator=generator).tolist():
            if fixed >= target:
                break
            a, b = chunks[j]
            out[i, a:b] = torch.tensor(ref[a:b], dtype=torch.long)
            fixed += b - a
    return out


def splice(s: Sampled, hinted: Sampled, groups: torch.Tensor, reward: str, G: int, replace_share: float
           ) -> tuple[Sampled, int]:
    """``s`` with up to ``max(1, ⌊replace_share·G⌋)`` completions of each group in ``groups`` (the indices of the
    all-wrong groups, in ``hinted``'s order: ``hinted`` holds ``G`` hinted completions per group) replaced by that
    group's hinted completions that ``reward`` scores ``> 0``; the last completions of a group are replaced first.
    Returns the new batch and how many completions were replaced."""
    k_max = max(1, int(replace_share * G))
    ok = hinted.per_function[:, hinted.names.index(reward)].float() > 0
    dst, src = [], []
    for j, b in enumerate(groups.tolist()):
        good = [j * G + i for i in range(G) if bool(ok[j * G + i])][:k_max]
        dst += [b * G + G - 1 - t for t in range(len(good))]
        src += good
    if not dst:
        return s, 0
    d, h = torch.tensor(dst), torch.tensor(src)

    def put(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        a[d.to(a.device)] = b[h.to(b.device)].to(a.device)
        return a

    texts, comp_ids = list(s.texts), list(s.comp_ids)
    for i, j in zip(dst, src, strict=True):
        texts[i], comp_ids[i] = hinted.texts[j], hinted.comp_ids[j]
    return replace(s, sequences=put(s.sequences, hinted.sequences), commit_step=put(s.commit_step, hinted.commit_step),
                   given=put(s.given, hinted.given), lengths=put(s.lengths, hinted.lengths), texts=texts,
                   comp_ids=comp_ids, per_function=put(s.per_function, hinted.per_function),
                   total=put(s.total, hinted.total)), len(dst)


def reference_tokens(rows: list[dict[str, Any]], column: str, tokenizer: Any) -> list[list[int]]:
    """The reference solutions of ``rows`` (their ``column``), tokenized without special tokens."""
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(column), str)]
    if missing:
        raise ValueError(f"hint_column {column!r}: row(s) {missing} of this micro-batch have no text in that column "
                         f"(columns: {sorted(rows[0])})")
    return [list(tokenizer(r[column], add_special_tokens=False)["input_ids"]) for r in rows]
