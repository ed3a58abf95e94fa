"""Native LLaDA architecture (LLaDA 8B, LLaDA 1.5, iLLaDA) as a transformers 5 model.

Parameter names and ``config.json`` fields match the released checkpoints (``docs/concepts.md`` §7), so
``LLaDAModelLM.from_pretrained(local_dir)`` loads them without their transformers-4 remote code.
Attention is bidirectional and goes through the library's attention interface (SDPA by default).
The model exposes ``hidden_states`` and ``head`` separately so callers apply the large output head
only where logits are needed, and a KV-context path used by the sampler's block caches.

``save_pretrained`` copies this module and ``configuration_llada.py`` beside the weights and writes their
``auto_map`` (``docs/models.md``, "Portable checkpoints"), so this module imports only torch, transformers and,
relatively, its configuration module.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

from .configuration_llada import LLADA_LORA_TARGETS, LLaDAConfig, check_mask_token_id

KV = tuple[torch.Tensor, torch.Tensor]


class LLaDARMSNorm(nn.Module):
    """RMSNorm computed in fp32: ``w * x / sqrt(mean(x²) + eps)``."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables in fp32, shaped ``[B, 1, T, head_dim]`` for broadcasting over heads.

    ``inv_freq_j = θ^(-2j/d)``, angle ``= pos · inv_freq_j``, duplicated over both halves.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, d]`` in full precision: ``x·cos + rotate_half(x)·sin``."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


#: attention implementations a recipe may choose (``model.attn_implementation``).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (no causal mask); ``attention_mask`` is additive. Returns ``[B, T, H, d]``."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class LLaDABlock(GradientCheckpointingLayer):
    """One llama-type block (``docs/concepts.md`` §7), no causal mask:

    ``h = x + attn_out(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))`` with ``n = attn_norm(x)``;
    ``out = h + ff_out(silu(ff_proj(m)) * up_proj(m))`` with ``m = ff_norm(h)``.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.n_heads // config.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        d, kv_dim, bias = config.d_model, config.n_kv_heads * config.head_dim, config.include_bias
        qkv_bias = bias or bool(config.include_qkv_bias)
        self.attn_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = LLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=bias)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=bias)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_kv: KV | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KV]:
        """Apply the block; with ``context_kv`` the queries also attend to those cached keys/values."""
        bsz, seq_len, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own_kv = (k, v)
        if context_kv is not None:
            k = torch.cat((context_kv[0].to(k.dtype), k), dim=2)
            v = torch.cat((context_kv[1].to(v.dtype), v), dim=2)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.config.attention_dropout if self.training else 0.0
        a, _ = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=False)
        h = x + self.dropout(self.attn_out(a.reshape(bsz, seq_len, -1)))
        m = self.ff_norm(h)
        out = h + self.dropout(self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m)))
        return (out, own_kv) if return_kv else out


class LLaDAModel(nn.Module):
    """Container holding ``transformer.{wte, blocks, ln_f, ff_out}`` under the released names."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.embedding_size, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": LLaDARMSNorm(config.d_model, config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, config.embedding_size, bias=config.include_bias),
            }
        )
        self.emb_drop = nn.Dropout(config.embedding_dropout)


class LLaDAPreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing for the LLaDA architecture."""

    config: LLaDAConfig
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LLaDABlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std) linear/embedding weights (truncated at ``±init_cutoff_factor·std``
        when set), zero biases, unit norm weights."""
        std, cutoff = self.config.init_std, self.config.init_cutoff_factor
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if cutoff is None:
                init.normal_(module.weight, mean=0.0, std=std)
            else:
                init.trunc_normal_(module.weight, mean=0.0, std=std, a=-cutoff * std, b=cutoff * std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LLaDARMSNorm):
            init.ones_(module.weight)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA masked diffusion LM: bidirectional transformer + output head (``model.transformer.*``)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}
    shift_logits = False
    supports_kv_context = True

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @property
    def mask_token_id(self) -> int:
        """The mask token ``M`` (126336 for LLaDA, 5 for iLLaDA); setting it updates the config."""
        return int(self.config.mask_token_id)

    @mask_token_id.setter
    def mask_token_id(self, value: int) -> None:
        self.config.mask_token_id = check_mask_token_id(value, self.config.vocab_size)

    def lora_target_modules(self) -> list[str]:
        """LoRA target names of this architecture (``ff_out`` also matches the output head)."""
        return list(LLADA_LORA_TARGETS)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``model.transformer.wte``."""
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        """The output head ``model.transformer.ff_out``."""
        return self.model.transformer.ff_out

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the output head."""
        self.model.transformer.ff_out = new_embeddings

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        context_kv: list[KV] | None = None,
        context_mask: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Final hidden states after ``ln_f``, ``[B, T, d_model]``.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1 = real token, 0 = padding (keys of the query tokens).
            position_ids: ``[B, T]`` or ``[T]`` RoPE positions; default ``cumsum(mask) - 1``
                (so left padding does not change outputs). Required with ``context_kv``.
            context_kv: per layer ``(k, v)``, each ``[B, n_kv_heads, T_ctx, head_dim]``, post-RoPE;
                the queries attend to these and to their own keys/values.
            context_mask: ``[B, T_ctx]``, 1 = attend to that context position.
            return_kv: also return this pass's own per-layer ``(k, v)`` (post-RoPE).
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        bsz, seq_len = input_ids.shape
        device = input_ids.device
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(bsz, seq_len)}")
        if position_ids is None:
            if context_kv is not None:
                raise ValueError("position_ids are required when context_kv is given")
            if attention_mask is None:
                position_ids = torch.arange(seq_len, device=device).expand(bsz, seq_len)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif position_ids.dim() == 1:
            position_ids = position_ids.expand(bsz, seq_len)
        key_parts: list[torch.Tensor] = []
        if context_kv is not None:
            ctx_len = self._check_context(context_kv, bsz)
            if context_mask is not None and tuple(context_mask.shape) != (bsz, ctx_len):
                raise ValueError(f"context_mask shape {tuple(context_mask.shape)} != {(bsz, ctx_len)}")
            if context_mask is not None or attention_mask is not None:
                ones = torch.ones(bsz, ctx_len, dtype=torch.bool, device=device)
                key_parts.append(ones if context_mask is None else context_mask.to(device=device, dtype=torch.bool))
        if key_parts or attention_mask is not None:
            own = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            key_mask = torch.cat([*key_parts, own], dim=1)
            # A row that may attend to nothing would give NaN under SDPA; let it attend everywhere instead.
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        else:
            key_mask = None
        x = self.model.emb_drop(self.model.transformer.wte(input_ids))
        mask = create_bidirectional_mask(config=cfg, inputs_embeds=x, attention_mask=key_mask)
        cos, sin = rope_cos_sin(position_ids.to(device), cfg.head_dim, cfg.rope_theta)
        new_kv: list[KV] = []
        for i, block in enumerate(self.model.transformer.blocks):
            ctx = None if context_kv is None else context_kv[i]
            out = block(x, cos=cos, sin=sin, attention_mask=mask, context_kv=ctx, return_kv=return_kv)
            if return_kv:
                x, kv = out
                new_kv.append(kv)
            else:
                x = out
        h = self.model.transformer.ln_f(x)
        return (h, new_kv) if return_kv else h

    def _check_context(self, context_kv: list[KV], bsz: int) -> int:
        cfg = self.config
        if len(context_kv) != cfg.n_layers:
            raise ValueError(f"context_kv has {len(context_kv)} layers, the model has {cfg.n_layers}")
        k0 = context_kv[0][0]
        expected = (bsz, cfg.n_kv_heads, k0.shape[2] if k0.dim() == 4 else -1, cfg.head_dim)
        for i, (k, v) in enumerate(context_kv):
            if tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise ValueError(
                    f"context_kv[{i}] shapes {tuple(k.shape)}/{tuple(v.shape)} != "
                    f"[B, n_kv_heads, T_ctx, head_dim] = {expected}"
                )
        return expected[2]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Output head ``ff_out(h)`` on ``[..., d_model]``, returning ``[..., vocab_size]`` logits.

        Rows beyond ``vocab_size`` (padding of ``embedding_size``) are dropped; logits are unscaled
        unless ``scale_logits`` (then ``× 1/sqrt(d_model)``).
        """
        logits = self.model.transformer.ff_out(h)
        if self.config.embedding_size > self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        if self.config.scale_logits:
            logits = logits * (1.0 / math.sqrt(self.config.d_model))
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        logits_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> MaskedLMOutput | tuple:
        """Logits ``[B, T, vocab_size]`` for every position (or the ``logits_to_keep`` selection).

        ``labels`` (``[B, T]``, -100 = ignore) give a plain token-mean cross-entropy in ``loss``;
        the diffusion losses of ``docs/concepts.md`` §1-§4 live in the likelihood/trainer modules.
        ``logits_mask`` (``[B, T]`` bool) returns logits ``[N, vocab_size]`` at its True positions only,
        in row-major order; trainers use it so that DDP/DeepSpeed hooks run while the head is applied only
        where the loss reads it. ``return_hidden=True`` returns no logits and ``hidden_states=(h,)`` with the
        final hidden states ``[B, T, d_model]``.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        if return_hidden:
            # Final hidden states only (after ln_f), for callers that apply ``head`` themselves while the
            # forward still runs through DDP / DeepSpeed wrappers.
            return MaskedLMOutput(logits=None, hidden_states=(h,))
        if logits_mask is not None:
            # Logits only where they are needed (e.g. the masked positions of a diffusion loss): [N, V].
            if labels is not None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError("logits_mask cannot be combined with labels or logits_to_keep")
            if logits_mask.shape != input_ids.shape:
                raise ValueError(
                    f"logits_mask {tuple(logits_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
            h = h[logits_mask.bool()]
        elif not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            if labels is not None:
                raise ValueError("labels cannot be combined with logits_to_keep")
            h = slice_logits_to_keep(h, logits_to_keep)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                labels.reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        use_dict = self.config.return_dict if return_dict is None else return_dict
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if use_dict else out.to_tuple()


# Saving the model copies this module and its configuration module beside the weights.
LLaDAModelLM.register_for_auto_class("AutoModelForMaskedLM")

if __name__ == "align.models.llada":
    # The native classes open LLaDA checkpoints in any process that imports dlm-align. A copy of this module
    # loaded from a checkpoint as remote code registers nothing: transformers maps its classes itself.
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
