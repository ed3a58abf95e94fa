"""Helpers shared by the reward functions: completion text, token-id lists, whitespace ids.

TRL passes completions either as strings (standard data) or as lists of chat messages
(``[{"role": "assistant", "content": "..."}]``, conversational data), and dlm-align's GRPO stage does the same,
following the form of the dataset's prompts; ``completion_ids`` is a list of per-completion token-id lists.
Every reward in this package accepts both forms through these helpers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "as_id_lists",
    "completion_text",
    "message_text",
    "prompt_messages",
    "strip_trailing",
    "whitespace_ids",
]


def message_text(content: Any) -> str:
    """Text of one chat message ``content``: a string, or a list of content parts (``{"type": "text", ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def completion_text(completion: Any) -> str:
    """Plain text of one completion.

    Strings are returned as they are; ``None`` gives ``""``; a chat-style list of messages gives the
    contents of its assistant messages (messages without a role count as assistant) joined by newlines.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return message_text(completion.get("content"))
    if isinstance(completion, Sequence):
        texts = [
            message_text(m.get("content"))
            for m in completion
            if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"
        ]
        return "\n".join(texts)
    return str(completion)


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """The prompt as a list of chat messages (a plain string becomes one user message)."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping):
        return [{"role": str(prompt.get("role", "user")), "content": message_text(prompt.get("content"))}]
    return [
        {"role": str(m.get("role", "user")), "content": message_text(m.get("content"))}
        for m in prompt
        if isinstance(m, Mapping)
    ]


def as_id_lists(completion_ids: Any) -> list[list[int]]:
    """Normalise ``completion_ids`` (2-D tensor, list of 1-D tensors, or list of int lists) to int lists."""
    if isinstance(completion_ids, torch.Tensor):
        if completion_ids.dim() != 2:
            raise ValueError(f"completion_ids tensor must be 2-D [B, L], got shape {tuple(completion_ids.shape)}")
        return [row.tolist() for row in completion_ids]
    out = []
    for i, ids in enumerate(completion_ids):
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"completion_ids[{i}] must be 1-D, got shape {tuple(ids.shape)}")
            out.append([int(t) for t in ids.tolist()])
        elif ids is None:
            out.append([])
        else:
            out.append([int(t) for t in ids])
    return out


def strip_trailing(ids: list[int], pad_ids: Sequence[int]) -> list[int]:
    """``ids`` without its trailing run of pad/EOS ids."""
    if not pad_ids:
        return ids
    pads = set(pad_ids)
    n = len(ids)
    while n > 0 and ids[n - 1] in pads:
        n -= 1
    return ids[:n]


def whitespace_ids(texts: Sequence[str]) -> list[list[int]]:
    """Whitespace-tokenise ``texts`` into ids from one vocabulary shared by the batch.

    Used when a reward needs token ids but the caller passed only text: equal words get equal ids,
    so repetition structure is preserved (ids carry no other meaning).
    """
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in text.split()] for text in texts]
