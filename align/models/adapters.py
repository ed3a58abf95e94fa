"""One interface for every denoiser: ``hidden_states`` + ``head`` + ``mask_token_id``.

The native :class:`~align.models.llada.LLaDAModelLM` implements :class:`Denoiser` itself. Wrappers
give other models the same interface:

- :class:`DreamAdapter`: a bidirectional Qwen2-style model (Dream) whose logit at position i
  predicts token i+1 (``shift_logits = True``: the prediction for token i is read at i-1).
- :class:`MaskedLMAdapter`: any ``AutoModelForMaskedLM`` (hidden states of the base model, then
  the model's MLM head).

:func:`load_denoiser` picks the right one from a checkpoint directory, without remote code.
"""

import os
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import MaskedLMOutput

from align.models.llada import check_mask_token_id
from align.models.loading import (
    check_loading_info,
    device_map_for,
    is_llada_config,
    linear_leaf_names,
    load_model,
    load_tokenizer,
    read_config_dict,
    resolve_model_dir,
)

DENOISER_KINDS = ("auto", "llada", "dream", "masked_lm")
# Keys of Dream's config.json that only concern its remote code or are not Qwen2 fields.
_DREAM_DROP_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "mask_token_id")


@runtime_checkable
class Denoiser(Protocol):
    """What samplers, likelihood estimators and trainers need from a masked denoiser.

    ``hidden_states(ids, attention_mask, position_ids)`` returns the model's ``[B, T, d]`` final
    hidden states and ``head(h)`` its logits. With ``shift_logits = False`` (LLaDA, masked LMs)
    ``head(h)[:, i]`` is ``f_θ(· | z)_i``, the distribution of token i. With ``shift_logits = True``
    (Dream) the distribution of token i is ``head(h)[:, i - 1]``: read ``h[:, i - 1]``, or apply
    :func:`shift_right` to ``h`` / the logits. ``supports_kv_context`` says whether
    ``hidden_states`` accepts ``context_kv`` / ``context_mask`` / ``return_kv``.
    """

    shift_logits: bool
    supports_kv_context: bool

    @property
    def mask_token_id(self) -> int: ...

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def head(self, h: torch.Tensor) -> torch.Tensor: ...

    def lora_target_modules(self) -> list[str]: ...


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Align a shifted model's ``[B, T, ...]`` output: ``out[:, i] = x[:, i-1]`` (i ≥ 1), ``out[:, 0] = x[:, 0]``.

    Position 0 (always part of the prompt) keeps its own value, as in Dream's sampler.
    """
    return torch.cat([x[:, :1], x[:, :-1]], dim=1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` (clamped at 0), so left padding leaves positions unchanged."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _WrappedDenoiser(nn.Module):
    """Common part of the wrappers: owns ``model``, the body (base model) and the head module."""

    shift_logits = False
    supports_kv_context = False

    def __init__(self, model: PreTrainedModel, body: nn.Module, head: nn.Module, mask_token_id: int | None) -> None:
        super().__init__()
        self.model = model
        self._body = [body]  # kept out of the module tree: it is already inside ``model``
        self._head = [head]
        if mask_token_id is None:
            mask_token_id = getattr(model.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(f"{type(model).__name__}: no mask_token_id in its config; pass mask_token_id=")
        self._mask_token_id = check_mask_token_id(mask_token_id, self.vocab_size)

    @property
    def config(self):
        """The wrapped model's config."""
        return self.model.config

    @property
    def vocab_size(self) -> int:
        """Number of logits the head produces."""
        return int(self.model.config.vocab_size)

    @property
    def mask_token_id(self) -> int:
        """The mask token id ``M``."""
        return self._mask_token_id

    @mask_token_id.setter
    def mask_token_id(self, value: int) -> None:
        self._mask_token_id = check_mask_token_id(value, self.vocab_size)

    def _body_hidden(self, input_ids, attention_mask, position_ids, **extra) -> torch.Tensor:
        kwargs = dict(extra)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self._body[0](input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the output head to ``[..., d]`` hidden states."""
        return self._head[0](h)

    def get_output_embeddings(self) -> nn.Module:
        """The head module (for :func:`align.models.lora_exclude_modules`)."""
        return self._head[0]

    def lora_target_modules(self) -> list[str]:
        """Names of the linear layers of the body (PEFT suffix names), output head excluded."""
        return linear_leaf_names(self._body[0], exclude=self._head[0])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Aligned logits ``[B, T, vocab]``: position i scores token i (shift undone for Dream)."""
        logits = self.head(self.hidden_states(input_ids, attention_mask, position_ids))
        return MaskedLMOutput(logits=shift_right(logits) if self.shift_logits else logits)


class DreamAdapter(_WrappedDenoiser):
    """Dream-style denoiser: a Qwen2-like ``*ForCausalLM`` made bidirectional, logits shifted.

    Dream's output at position i scores token i+1, so ``shift_logits = True``: consumers read the
    prediction for token i at i-1 (``forward`` returns logits already aligned with
    :func:`shift_right`). Wrapping sets ``config.is_causal = False`` and ``is_causal = False`` on
    every attention module, so SDPA and eager attention are both bidirectional.
    """

    shift_logits = True

    def __init__(self, model: PreTrainedModel, mask_token_id: int | None = None) -> None:
        body, head = model.base_model, model.get_output_embeddings()
        if body is model or head is None:
            raise TypeError(f"{type(model).__name__}: DreamAdapter needs a model with a base model and an LM head")
        super().__init__(model, body, head, mask_token_id)
        model.config.is_causal = False
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states of the base model, unshifted (``h[:, i]`` scores token i+1)."""
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        return self._body_hidden(input_ids, attention_mask, position_ids, use_cache=False)


class MaskedLMAdapter(_WrappedDenoiser):
    """Any ``AutoModelForMaskedLM``: base-model hidden states, then the model's MLM head.

    The head is ``head`` when given, else the one child of ``model`` besides the base model that
    holds parameters (``cls`` for BERT, ``lm_head`` for RoBERTa); other layouts need ``head=``.
    """

    def __init__(self, model: PreTrainedModel, mask_token_id: int | None = None, head: nn.Module | None = None) -> None:
        body = model.base_model
        if body is model:
            raise TypeError(f"{type(model).__name__}: MaskedLMAdapter needs a model with a separate base model")
        if head is None:
            others = [m for m in model.children() if m is not body and any(True for _ in m.parameters())]
            if len(others) != 1:
                raise ValueError(
                    f"{type(model).__name__}: cannot tell which module is the MLM head "
                    f"({[type(m).__name__ for m in others]}); pass head="
                )
            head = others[0]
        super().__init__(model, body, head, mask_token_id)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden state of the base model, ``[B, T, d]``."""
        return self._body_hidden(input_ids, attention_mask, position_ids)


def load_dream(
    model_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> DreamAdapter:
    """Load a Dream checkpoint into a native bidirectional ``Qwen2ForCausalLM`` (no remote code)."""
    raw = read_config_dict(model_dir)
    fields = {k: v for k, v in raw.items() if k not in _DREAM_DROP_KEYS}
    if mask_token_id is None:
        mask_token_id = raw.get("mask_token_id")
    config = Qwen2Config(**fields)
    config.is_causal = False
    model, info = Qwen2ForCausalLM.from_pretrained(
        model_dir,
        config=config,
        dtype="auto" if dtype is None else dtype,
        device_map=device_map_for(device),
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    check_loading_info(model_dir, info, allow_unexpected=True)
    return DreamAdapter(model, mask_token_id=mask_token_id)


def _detect_kind(raw: dict) -> str:
    if is_llada_config(raw):
        return "llada"
    if str(raw.get("model_type", "")).lower() == "dream" or "DreamModel" in (raw.get("architectures") or []):
        return "dream"
    return "masked_lm"


def load_denoiser(
    path_or_name: str | os.PathLike,
    kind: str = "auto",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
) -> Denoiser:
    """Load any supported denoiser from a checkpoint directory.

    ``kind="auto"`` reads ``config.json``: ``model_type`` llada (or ``LLaDAModelLM``) → native
    :class:`LLaDAModelLM`; ``Dream`` (or ``DreamModel``) → :class:`DreamAdapter`; anything else →
    :class:`MaskedLMAdapter` over ``AutoModelForMaskedLM``. The mask id comes from
    ``mask_token_id``, else the config, else (masked LMs) the tokenizer of the directory.
    """
    if kind not in DENOISER_KINDS:
        raise ValueError(f"kind must be one of {DENOISER_KINDS}, got {kind!r}")
    model_dir = resolve_model_dir(path_or_name)
    raw = read_config_dict(model_dir)
    kind = _detect_kind(raw) if kind == "auto" else kind
    common = {"dtype": dtype, "device": device, "mask_token_id": mask_token_id}
    if kind == "llada":
        return load_model(model_dir, attn_implementation=attn_implementation, **common)
    if kind == "dream":
        return load_dream(model_dir, attn_implementation=attn_implementation, **common)
    model, info = AutoModelForMaskedLM.from_pretrained(
        model_dir,
        dtype="auto" if dtype is None else dtype,
        device_map=device_map_for(device),
        attn_implementation=attn_implementation,
        trust_remote_code=False,
        output_loading_info=True,
    )
    check_loading_info(model_dir, info, allow_unexpected=True)
    if mask_token_id is None and getattr(model.config, "mask_token_id", None) is None:
        mask_token_id = load_tokenizer(model_dir).mask_token_id
    return MaskedLMAdapter(model, mask_token_id=mask_token_id)
