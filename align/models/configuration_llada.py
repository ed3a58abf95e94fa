"""Configuration of the native LLaDA architecture (LLaDA 8B, LLaDA 1.5, iLLaDA).

Reads every field of the released ``config.json`` (``docs/concepts.md`` §7); values that select code paths this
implementation lacks are rejected with the field named.

This module is saved beside every checkpoint's weights (``docs/models.md``, "Portable checkpoints"), so it
imports nothing but the standard library and transformers.
"""

import os
from typing import ClassVar

from transformers import PretrainedConfig

#: LoRA targets that exist in this architecture (``docs/concepts.md`` §7).
LLADA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]

#: ``auto_map`` written into every saved ``config.json``: the Auto classes that open the checkpoint with
#: ``trust_remote_code=True`` through the two modules saved beside the weights. ``AutoModel`` and
#: ``AutoModelForCausalLM`` name the same class as in the released checkpoints, for scripts and tools that
#: open a remote-code model through them (the model is not causal).
LLADA_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "llada.LLaDAModelLM",
    "AutoModelForMaskedLM": "llada.LLaDAModelLM",
    "AutoModelForCausalLM": "llada.LLaDAModelLM",
}
#: Modules an ``auto_map`` entry may name for it to be this package's own (kept on load); any other ``auto_map``,
#: such as the released checkpoints' pointer to their transformers-4 ``modeling_llada``, is dropped.
_OWN_MODULES = ("configuration_llada", "llada")


def is_own_auto_map(auto_map: object) -> bool:
    """Whether ``auto_map`` points only at the modules saved by this package (``LLADA_AUTO_MAP``'s modules).

    An entry may name the Hub repository holding the code first (``org/name--llada.LLaDAModelLM``).
    """
    if not isinstance(auto_map, dict) or not auto_map:
        return False
    refs = [ref for value in auto_map.values() for ref in (value if isinstance(value, (list, tuple)) else [value])]
    return all(isinstance(ref, str) and ref.split("--")[-1].split(".")[0] in _OWN_MODULES for ref in refs)

# Fields of the released config.json whose other values select code paths this implementation lacks.
_FIXED_VALUES: dict[str, tuple] = {
    "alibi": (False,),
    "rope": (True,),
    "block_type": ("llama",),
    "block_group_size": (1,),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (None, False),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "clip_qkv": (None,),
    "activation_type": ("silu",),
}
_INIT_FNS = ("normal", "mitchell", "kaiming_normal", "fan_in", "full_megatron")


_POSITIVE_INTS = (
    "d_model",
    "n_heads",
    "n_kv_heads",
    "n_layers",
    "mlp_hidden_size",
    "vocab_size",
    "embedding_size",
    "max_sequence_length",
)


def _fail(message: str) -> None:
    raise ValueError(f"LLaDAConfig: {message}")


def _same(value: object, allowed: object) -> bool:
    return value is allowed or (type(value) is type(allowed) and value == allowed)


class LLaDAConfig(PretrainedConfig):
    """Configuration of the LLaDA architecture, reading the released ``config.json`` field names.

    Defaults are the released LLaDA-8B values. ``n_kv_heads`` (None: ``n_heads``, or 1 with
    ``multi_query_attention``), ``mlp_hidden_size`` (None: ``mlp_ratio * d_model``) and
    ``embedding_size`` (None: ``vocab_size``) are resolved at construction. ``eot_token_id`` (not in
    the released file) is the optional end-of-turn id used by samplers. Values that select
    features this implementation does not have (ALiBi, non-llama blocks, LayerNorm, QK-norm, ...)
    raise ``ValueError`` naming the field. ``flash_attention``, ``init_device``, ``precision`` and
    ``use_cache`` are accepted and have no effect (pick the kernel with ``attn_implementation``).
    ``auto_map`` is kept when it is this package's own (:data:`LLADA_AUTO_MAP`; plain transformers needs it
    to open a saved checkpoint without dlm-align) and dropped otherwise (the released checkpoints' pointer to
    their transformers-4 remote code). :meth:`save_pretrained` always writes :data:`LLADA_AUTO_MAP`.
    """

    model_type = "llada"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_ratio: int | float = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    clip_qkv: float | None = None
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = None
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    include_bias: bool = False
    include_qkv_bias: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    mask_token_id: int = 126336
    eot_token_id: int | None = None
    init_device: str | None = None
    init_fn: str = "normal"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = None
    use_cache: bool = False

    def __post_init__(self, **kwargs):
        auto_map = kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        if is_own_auto_map(auto_map):
            self.auto_map = dict(auto_map)
        self._resolve_and_check()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``config.json`` with :data:`LLADA_AUTO_MAP`, and this module beside it.

        The model's ``save_pretrained`` calls this and also copies the modeling module, so the directory opens
        with ``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` where dlm-align is not installed.
        """
        self.auto_map = dict(LLADA_AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _resolve_and_check(self) -> None:
        for field, allowed in _FIXED_VALUES.items():
            value = getattr(self, field)
            if not any(_same(value, a) for a in allowed):
                _fail(f"{field}={value!r} is not supported (supported: {', '.join(map(repr, allowed))})")
        # n_kv_heads / multi_query_attention, as the released code's effective_n_kv_heads.
        mqa = self.multi_query_attention
        if self.n_kv_heads is None:
            self.n_kv_heads = 1 if mqa else self.n_heads
        elif mqa is not None and self.n_kv_heads != (1 if mqa else self.n_heads):
            _fail(f"multi_query_attention={mqa} conflicts with n_kv_heads={self.n_kv_heads}")
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = int(self.mlp_ratio * self.d_model)
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        for field in _POSITIVE_INTS:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"{field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            _fail(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even width")
        if self.n_heads % self.n_kv_heads:
            _fail(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.embedding_size < self.vocab_size:
            _fail(f"embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}")
        for field in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                _fail(f"{field} must be in [0, 1), got {getattr(self, field)!r}")
        for field in ("rms_norm_eps", "rope_theta", "init_std"):
            if not getattr(self, field) > 0:
                _fail(f"{field} must be positive, got {getattr(self, field)!r}")
        if self.init_fn not in _INIT_FNS:
            _fail(f"init_fn={self.init_fn!r} is not one of {_INIT_FNS}")
        if self.weight_tying and self.include_bias:
            _fail("include_bias=True is not supported together with weight_tying=True")
        check_mask_token_id(self.mask_token_id, self.vocab_size)

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model // n_heads``."""
        return self.d_model // self.n_heads


def check_mask_token_id(mask_token_id: object, vocab_size: int) -> int:
    """Return ``mask_token_id`` as an int, raising ``ValueError`` unless it lies in ``[0, vocab_size)``."""
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be an integer in [0, {vocab_size}), got {mask_token_id!r}")
    return mask_token_id


def tiny_llada_config(**overrides) -> LLaDAConfig:
    """A small LLaDA config for tests and the embedded default model.

    Defaults: vocab 256, d_model 64, 2 layers, 4 heads, MLP 128; the mask id is ``vocab_size - 1``
    and EOS/pad ``vocab_size - 2`` unless overridden. Any LLaDAConfig field can be overridden.
    """
    vocab_size = overrides.pop("vocab_size", 256)
    values = {
        "vocab_size": vocab_size,
        "embedding_size": vocab_size,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": None,
        "n_layers": 2,
        "mlp_hidden_size": 128,
        "max_sequence_length": 512,
        "rope_theta": 10000.0,
        "mask_token_id": vocab_size - 1,
        "eos_token_id": vocab_size - 2,
        "pad_token_id": vocab_size - 2,
    }
    values.update(overrides)
    return LLaDAConfig(**values)


def llada_8b_config(**overrides) -> LLaDAConfig:
    """The released LLaDA-8B / LLaDA 1.5 config (``docs/concepts.md`` §7, the LLaDAConfig defaults).

    iLLaDA-8B has shapes of its own (grouped-query attention, another vocabulary): read them from its
    ``config.json``. ``eot_token_id`` (end of turn, 126348) is not in
    the released file; it is set here for samplers that stop at EOT.
    """
    values = {"n_kv_heads": 32, "eot_token_id": 126348, "architectures": ["LLaDAModelLM"]}
    return LLaDAConfig(**{**values, **overrides})


# Saving a config copies this module beside config.json (transformers' custom-object saving).
LLaDAConfig.register_for_auto_class("AutoConfig")
