"""One interface for every denoiser: ``hidden_states`` + ``head`` + ``mask_token_id``.

The native :class:`~align.models.llada.LLaDAModelLM` implements :class:`Denoiser` itself. Wrappers
give other models the same interface:

- :class:`DreamAdapter`: a bidirectional Qwen2-style model (Dream) whose logit at position i
  predicts token i+1 (``shift_logits = True``: the prediction for token i is read at i-1), or, with
  ``aligned=True``, whose hidden states are realigned so that position i scores token i.
- :class:`MaskedLMAdapter`: any ``AutoModelForMaskedLM`` (hidden states of the base model, then
  the model's MLM head).

The wrappers are ``PreTrainedModel`` subclasses, so ``transformers.Trainer`` and PEFT train, save
and resume them like any Hugging Face model; ``save_pretrained`` writes the wrapped model's own
checkpoint format (plus ``mask_token_id``, and Dream's markers for a Dream model), which
:func:`load_denoiser` reads back.

:func:`load_denoiser` picks the right one from a checkpoint directory, without remote code;
:func:`detect_denoiser_kind` tells which one it would pick without loading any weights.
"""

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
from align.models.resolve import BUILTIN_PREFIX, TOKENIZER_FILES, ResolvedModel, hub_cache_dir, parse_hub_id

#: ``kind`` values of :func:`load_denoiser` (a recipe's ``model.adapter``, ``dlm-align generate --adapter``).
DENOISER_KINDS = ("auto", "llada", "dream", "masked_lm")
#: Kinds whose models accept a KV context, which the sampler's ``prefix`` / ``dual`` caches need.
KV_CONTEXT_KINDS = ("llada",)
# Keys of Dream's config.json that only concern its remote code or are not Qwen2 fields.
_DREAM_DROP_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "mask_token_id")
# What marks a config.json as Dream's; written back when a DreamAdapter is saved.
_DREAM_MARKERS = {"model_type": "Dream", "architectures": ["DreamModel"]}


class MissingMaskTokenError(ValueError):
    """A wrapped model's mask token id is given nowhere (argument, config or tokenizer)."""


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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor: ...

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


class _WrappedDenoiser(PreTrainedModel):
    """Common part of the wrappers: owns ``model``, the body (base model) and the head module.

    Its state dict is ``model.`` + the wrapped model's; ``save_pretrained`` writes the wrapped model's
    checkpoint and ``load_state_dict`` accepts either form, so Trainer checkpoints resume.
    """

    shift_logits = False
    supports_kv_context = False
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    #: entries written into ``config.json`` on save, so that ``load_denoiser(kind="auto")`` picks this wrapper.
    _config_markers: dict[str, Any] = {}  # noqa: RUF012 (read-only class constant)

    def __init__(self, model: PreTrainedModel, body: nn.Module, head: nn.Module, mask_token_id: int | None) -> None:
        super().__init__(model.config)
        self.model = model
        self._body = [body]  # kept out of the module tree: it is already inside ``model``
        self._head = [head]
        self._lora_targets = linear_leaf_names(body, exclude=head)  # before any PEFT layer is injected
        self._no_split_modules = set(getattr(model, "_no_split_modules", None) or [])
        self.all_tied_weights_keys = {f"model.{k}": f"model.{v}"
                                      for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
        if mask_token_id is None:
            mask_token_id = getattr(model.config, "mask_token_id", None)
        if mask_token_id is None:
            raise MissingMaskTokenError(f"{type(model).__name__}: no mask_token_id in its config; pass mask_token_id=")
        self.mask_token_id = mask_token_id

    @property
    def vocab_size(self) -> int:
        """Number of logits the head produces."""
        return int(self.model.config.vocab_size)

    @property
    def mask_token_id(self) -> int:
        """The mask token id ``M``; setting it also writes ``config.mask_token_id`` (kept by ``save_pretrained``)."""
        return int(self.model.config.mask_token_id)

    @mask_token_id.setter
    def mask_token_id(self, value: int) -> None:
        self.model.config.mask_token_id = check_mask_token_id(value, self.vocab_size)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        """Whether the wrapped model implements gradient checkpointing (``activation_checkpointing_enable``
        then reaches its layers; otherwise it raises ``ValueError``)."""
        return bool(getattr(self.model, "supports_gradient_checkpointing", False))

    def _body_hidden(self, input_ids, attention_mask, position_ids, **extra) -> torch.Tensor:
        kwargs = dict(extra)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self._body[0](input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the output head to ``[..., d]`` hidden states."""
        return self._head[0](h)

    def get_input_embeddings(self) -> nn.Module:
        """The wrapped model's token embedding."""
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        """The head module (for :func:`align.models.lora_exclude_modules`)."""
        return self._head[0]

    def lora_target_modules(self) -> list[str]:
        """Names of the linear layers of the body (PEFT suffix names), output head excluded."""
        return list(self._lora_targets)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> MaskedLMOutput:
        """Aligned logits ``[B, T, vocab]``: position i scores token i (shift undone for Dream).

        As for :class:`~align.models.llada.LLaDAModelLM`: ``logits_mask`` (``[B, T]`` bool) returns logits
        ``[N, vocab]`` at its True positions only, and ``return_hidden=True`` returns ``hidden_states=(h,)``
        with aligned hidden states (``head(h[:, i])`` scores token i) and no logits. Trainers call these so
        that DDP / DeepSpeed hooks run.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        if self.shift_logits:
            h = shift_right(h)
        if return_hidden:
            return MaskedLMOutput(logits=None, hidden_states=(h,))
        if logits_mask is not None:
            if logits_mask.shape != input_ids.shape:
                raise ValueError(
                    f"logits_mask {tuple(logits_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
            h = h[logits_mask.bool()]
        return MaskedLMOutput(logits=self.head(h))

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        **kwargs: Any) -> None:
        """Save the wrapped model in its own format (``config.json`` with ``mask_token_id``, weights)."""
        if state_dict is not None:  # given with this wrapper's names (e.g. gathered by DeepSpeed)
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        self.model.save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        config_path = Path(save_directory) / "config.json"
        if self._config_markers and kwargs.get("is_main_process", True) and config_path.is_file():
            raw = json.loads(config_path.read_text(encoding="utf-8"))
            config_path.write_text(json.dumps({**raw, **self._config_markers}, indent=2) + "\n", encoding="utf-8")

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:
        """Load weights named as in this wrapper (``model.*``) or as in the wrapped model's checkpoint."""
        own = set(nn.Module.state_dict(self))
        if any(k in own for k in state_dict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


class DreamAdapter(_WrappedDenoiser):
    """Dream-style denoiser: a Qwen2-like ``*ForCausalLM`` made bidirectional, logits shifted.

    Dream's output at position i scores token i+1, so ``shift_logits = True``: consumers read the
    prediction for token i at i-1 (``forward`` returns logits already aligned with
    :func:`shift_right`). With ``aligned=True``, ``hidden_states`` returns the realigned states
    (``h[:, i]`` scores token i) and ``shift_logits`` is False, so every consumer, including the
    likelihood estimators and the SFT loss, reads position i for token i; :func:`load_denoiser` builds
    this form. Wrapping sets ``config.is_causal = False`` and ``is_causal = False`` on every attention
    module, so SDPA and eager attention are both bidirectional.
    """

    shift_logits = True
    _config_markers = _DREAM_MARKERS

    def __init__(self, model: PreTrainedModel, mask_token_id: int | None = None, *, aligned: bool = False) -> None:
        body, head = model.base_model, model.get_output_embeddings()
        if body is model or head is None:
            raise TypeError(f"{type(model).__name__}: DreamAdapter needs a model with a base model and an LM head")
        super().__init__(model, body, head, mask_token_id)
        self.aligned = bool(aligned)
        self.shift_logits = not self.aligned
        model.config.is_causal = False
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of the base model: unshifted (``h[:, i]`` scores token i+1), or realigned
        (``h[:, i]`` scores token i) when ``aligned``."""
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        h = self._body_hidden(input_ids, attention_mask, position_ids, use_cache=False)
        return shift_right(h) if self.aligned else h


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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden state of the base model, ``[B, T, d]``."""
        return self._body_hidden(input_ids, attention_mask, position_ids)


def load_dream(
    model_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
    aligned: bool = False,
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
    return DreamAdapter(model, mask_token_id=mask_token_id, aligned=aligned)


def _detect_kind(raw: dict) -> str:
    if is_llada_config(raw):
        return "llada"
    if str(raw.get("model_type", "")).lower() == "dream" or "DreamModel" in (raw.get("architectures") or []):
        return "dream"
    return "masked_lm"


def _cached_config_path(spec: str) -> Path | None:
    """``config.json`` of a model spec when it is on this machine (shipped, a directory, or in the Hub
    cache); None otherwise. Never downloads."""
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return resolve_model_dir(spec) / "config.json"
        except FileNotFoundError:
            return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path / "config.json"
    hub = parse_hub_id(spec)
    if hub is None or path.exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub[0], "config.json", cache_dir=hub_cache_dir(), revision=hub[1])
    return Path(found) if isinstance(found, str) else None


def detect_denoiser_kind(spec: str | os.PathLike, kind: str = "auto") -> str | None:
    """The kind :func:`load_denoiser` would load for ``spec``, read from ``config.json`` only (no weights).

    An explicit ``kind`` is returned as is. For ``"auto"``: ``llada``, ``dream`` or ``masked_lm`` when the
    checkpoint's ``config.json`` is on this machine (a shipped checkpoint, a directory, a cached Hub
    snapshot), else None (nothing is downloaded).
    """
    if kind not in DENOISER_KINDS:
        raise ValueError(f"kind must be one of {DENOISER_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    path = _cached_config_path(os.fspath(spec))
    if path is None or not path.is_file():
        return None
    return _detect_kind(read_config_dict(path.parent))


def _tokenizer_mask_id(model_dir: Path, tokenizer: Any) -> int | None:
    if tokenizer is None and any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(model_dir)
    return None if tokenizer is None else tokenizer.mask_token_id


def load_denoiser(
    path_or_name: str | os.PathLike | ResolvedModel,
    kind: str = "auto",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    mask_token_id: int | None = None,
    attn_implementation: str | None = None,
    tokenizer: Any = None,
    aligned: bool = True,
) -> Denoiser:
    """Load any supported denoiser from a checkpoint directory.

    ``kind="auto"`` reads ``config.json``: ``model_type`` llada (or ``LLaDAModelLM``) → native
    :class:`LLaDAModelLM`; ``Dream`` (or ``DreamModel``) → :class:`DreamAdapter`; anything else →
    :class:`MaskedLMAdapter` over ``AutoModelForMaskedLM``. The mask id comes from
    ``mask_token_id``, else the config, else (Dream, masked LMs) ``tokenizer`` or the tokenizer of the
    directory. A Dream model comes ``aligned`` (see :class:`DreamAdapter`) unless ``aligned=False``.

    Raises:
        FileNotFoundError: the spec does not resolve, or no ``config.json``.
        MissingMaskTokenError: a wrapped model whose mask id is given nowhere.
        ValueError: an unknown ``kind``, or weights that do not match the model.
    """
    if kind not in DENOISER_KINDS:
        raise ValueError(f"kind must be one of {DENOISER_KINDS}, got {kind!r}")
    model_dir = resolve_model_dir(path_or_name)
    raw = read_config_dict(model_dir)
    kind = _detect_kind(raw) if kind == "auto" else kind
    common = {"dtype": dtype, "device": device, "attn_implementation": attn_implementation}
    if kind == "llada":
        return load_model(model_dir, mask_token_id=mask_token_id, **common)
    if mask_token_id is None and raw.get("mask_token_id") is None:
        mask_token_id = _tokenizer_mask_id(model_dir, tokenizer)
        if mask_token_id is None:
            raise MissingMaskTokenError(f"{model_dir}: no mask token id in config.json or in the tokenizer; "
                                        "pass mask_token_id=")
    if kind == "dream":
        return load_dream(model_dir, mask_token_id=mask_token_id, aligned=aligned, **common)
    model, info = AutoModelForMaskedLM.from_pretrained(
        model_dir,
        dtype="auto" if dtype is None else dtype,
        device_map=device_map_for(device),
        attn_implementation=attn_implementation,
        trust_remote_code=False,
        output_loading_info=True,
    )
    check_loading_info(model_dir, info, allow_unexpected=True)
    return MaskedLMAdapter(model, mask_token_id=mask_token_id)
