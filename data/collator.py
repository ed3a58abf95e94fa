"""Batching tokenised rows: prompt/completion pairs for masked-diffusion SFT (:class:`SFTCollator`), and
left-padded prompts for rollouts and evaluation (:func:`left_pad`, :class:`PromptCollator`).

SFT batches: each row becomes ``prompt_ids + completion_ids`` followed by EOS padding on the right, as in LLaDA's SFT
recipe. ``eos_train`` says how many of the trailing padding EOS tokens are training targets:

* ``"all"`` (LLaDA): every padding EOS is a target and is attended; the model learns to stop, and tends
  to over-generate EOS when decoding without blocks.
* ``"none"``: padding is excluded from the loss and from attention.
* an integer ``k``: the first ``k`` padding tokens are targets, the rest are excluded.

The completion's own terminator (end of turn and one EOS, see :mod:`align.data.formatting`) is always a
target. ``L_b`` of the loss is the number of target positions of row ``b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class CollatorError(ValueError):
    """Raised for impossible collator settings or malformed features."""


def parse_eos_train(value: Any) -> str | int:
    """Validate an ``eos_train`` setting: ``"all"``, ``"none"`` or a non-negative integer."""
    if value in ("all", "none"):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CollatorError(f"eos_train must be 'all', 'none' or an integer >= 0, got {value!r}")
    return value


class SFTCollator:
    """Collate ``{"prompt_ids", "completion_ids"}`` features into a right-padded batch.

    Returns a dict with ``input_ids`` [B, T], ``response_mask`` [B, T] (bool, loss targets) and
    ``attention_mask`` [B, T] (0 only on padding that is not trained).
    """

    def __init__(self, pad_token_id: int, *, eos_train: str | int = "all", pad_to_multiple_of: int | None = None
                 ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.eos_train = parse_eos_train(eos_train)
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise CollatorError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise CollatorError("cannot collate an empty list of features")
        lengths = []
        for i, f in enumerate(features):
            if "prompt_ids" not in f or "completion_ids" not in f:
                raise CollatorError(f"feature {i} lacks 'prompt_ids'/'completion_ids' (keys: {sorted(f)})")
            if len(f["completion_ids"]) == 0:
                raise CollatorError(f"feature {i} has an empty completion")
            lengths.append(len(f["prompt_ids"]) + len(f["completion_ids"]))
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        response = torch.zeros(B, T, dtype=torch.bool)
        attention = torch.zeros(B, T, dtype=torch.long)
        for b, f in enumerate(features):
            P, C = len(f["prompt_ids"]), len(f["completion_ids"])
            input_ids[b, :P] = torch.as_tensor(f["prompt_ids"], dtype=torch.long)
            input_ids[b, P:P + C] = torch.as_tensor(f["completion_ids"], dtype=torch.long)
            n_pad = T - P - C
            trained_pad = n_pad if self.eos_train == "all" else 0 if self.eos_train == "none" else min(
                int(self.eos_train), n_pad)
            response[b, P:P + C + trained_pad] = True
            attention[b, :P + C + trained_pad] = 1
        return {"input_ids": input_ids, "response_mask": response, "attention_mask": attention}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, P], attention_mask [B, P])``."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    att = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.as_tensor(r)
            att[i, P - len(r):] = 1
    return ids, att


class PromptCollator:
    """Left-pad tokenised prompts (``prompt_ids``, ``prompt_mask``); pass every raw column through as ``rows``
    (rewards read them)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, att = left_pad([f["prompt_ids"] for f in features], self.pad_token_id)
        rows = [{k: v for k, v in f.items() if k not in ("prompt_ids", "completion_ids")} for f in features]
        return {"prompt_ids": ids, "prompt_mask": att, "rows": rows}
