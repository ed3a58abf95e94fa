"""The policy as the likelihood scorers see it, under PEFT and distributed wrappers.

:func:`align.likelihood.score_plan` needs ``hidden_states``, ``head`` and ``mask_token_id``. During training the
model must run through the wrapped model's ``forward`` so that DDP's and DeepSpeed's hooks fire:
:class:`ForwardShim` exposes that interface over the wrapped model, and :func:`base_model` finds the plain
denoiser under PEFT wrappers.
"""

from __future__ import annotations

import torch


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain denoiser under PEFT wrappers (its hidden_states runs the LoRA layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ForwardShim(torch.nn.Module):
    """Exposes ``hidden_states``/``head``/``mask_token_id`` while running the body through the wrapped model's
    ``forward`` (so DDP / DeepSpeed hooks fire)."""

    def __init__(self, wrapped: torch.nn.Module, inner: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped, self.inner = wrapped, inner

    @property
    def mask_token_id(self) -> int:
        return int(self.inner.mask_token_id)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.wrapped(input_ids=input_ids, attention_mask=attention_mask, return_hidden=True).hidden_states[0]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.head(h)
