"""Per-GPU memory estimate of a training step, from the model's shape alone (no model is built).

Everything here is a pure function of an :class:`Architecture` (``d_model``, ``n_layers``, heads, MLP width,
vocabulary) and a few numbers describing the step. ``docs/distributed.md`` ("Memory estimate") states every
formula; the per-token activation formulas were derived from :meth:`align.models.llada.LLaDABlock.forward`
by listing what autograd keeps for the backward pass, and ``tests/align/test_memory.py`` checks them against
the tensors autograd actually saves. :mod:`align.pipeline.plan` turns a recipe into the arguments of
:func:`estimate_memory`; ``bench/memory.py`` compares the estimate with measured peaks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GIB = float(1 << 30)

#: Hub ids of released checkpoints whose shapes are known without their ``config.json``: LLaDAConfig fields
#: on top of :func:`align.models.llada_8b_config`. iLLaDA-8B (model card): grouped-query attention with 8
#: key/value heads, MLP 14336, vocabulary 155136, tied embedding and head, mask id 5.
_ILLADA_8B = {"n_kv_heads": 8, "mlp_hidden_size": 14336, "vocab_size": 155136, "embedding_size": 155136,
              "weight_tying": True, "max_sequence_length": 8192, "mask_token_id": 5}
RELEASED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "GSAI-ML/LLaDA-8B-Base": {},
    "GSAI-ML/LLaDA-8B-Instruct": {},
    "GSAI-ML/iLLaDA-8B-Base": _ILLADA_8B,
    "GSAI-ML/iLLaDA-8B-Instruct": _ILLADA_8B,
}


@dataclass(frozen=True)
class Architecture:
    """The shape of a llama-type bidirectional transformer (LLaDA's block, ``docs/concepts.md`` §7).

    ``embedding_size`` rows of the embedding and head (``vocab_size`` of them are real tokens);
    ``weight_tying`` shares one matrix between them. ``model_type`` is informative: shapes of other
    llama-type denoisers (Dream) are read from their ``config.json`` field names.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    weight_tying: bool = False
    include_bias: bool = False
    qkv_bias: bool = False
    model_type: str = "llada"

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection: ``n_kv_heads · d_model / n_heads``."""
        return self.n_kv_heads * (self.d_model // self.n_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` widths of each linear layer of a block, by its LoRA target name."""
        d, kv, f = self.d_model, self.kv_dim, self.mlp_hidden_size
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "attn_out": (d, d),
                "ff_proj": (d, f), "up_proj": (d, f), "ff_out": (f, d)}


def _pick(config: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return None


def architecture_from_config(config: Mapping[str, Any] | Any) -> Architecture:
    """The :class:`Architecture` of a ``config.json`` mapping or a transformers config object.

    LLaDA configs are resolved through :class:`~align.models.LLaDAConfig` (its defaults fill what the file
    omits); other configs are read by the usual transformers names (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``tie_word_embeddings``).

    Raises:
        ValueError: a field the estimate needs is missing.
    """
    data = dict(config) if isinstance(config, Mapping) else config.to_dict()
    if data.get("model_type") == "llada" or "LLaDAModelLM" in (data.get("architectures") or []):
        from align.models import LLaDAConfig

        c = LLaDAConfig(**{k: v for k, v in data.items() if k not in ("model_type", "transformers_version")})
        return Architecture(c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.mlp_hidden_size, c.vocab_size,
                            c.embedding_size, bool(c.weight_tying), bool(c.include_bias),
                            bool(c.include_bias or c.include_qkv_bias), "llada")
    d = _pick(data, "d_model", "hidden_size")
    layers = _pick(data, "n_layers", "num_hidden_layers")
    heads = _pick(data, "n_heads", "num_attention_heads")
    mlp = _pick(data, "mlp_hidden_size", "intermediate_size")
    vocab = _pick(data, "vocab_size")
    missing = [n for n, v in (("hidden_size", d), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                              ("intermediate_size", mlp), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ValueError(f"config of model_type {data.get('model_type')!r} lacks {', '.join(missing)}")
    kv = _pick(data, "n_kv_heads", "num_key_value_heads") or heads
    tied = bool(_pick(data, "weight_tying", "tie_word_embeddings"))
    return Architecture(int(d), int(layers), int(heads), int(kv), int(mlp), int(vocab), int(vocab), tied,
                        False, bool(data.get("qkv_bias", data.get("model_type") in ("dream", "qwen2"))),
                        str(data.get("model_type") or "unknown"))


def released_architecture(repo_id: str) -> Architecture | None:
    """The architecture of a released checkpoint by Hub id (:data:`RELEASED_ARCHITECTURES`), else None."""
    if repo_id not in RELEASED_ARCHITECTURES:
        return None
    from align.models import llada_8b_config

    return architecture_from_config(llada_8b_config(**RELEASED_ARCHITECTURES[repo_id]))


# ------------------------------------------------------------------------------------------ parameters
def block_params(arch: Architecture) -> int:
    """Parameters of one block: seven linear layers (biases as configured) and two norm weights."""
    total = 0
    for name, (i, o) in arch.linear_shapes().items():
        bias = arch.qkv_bias if name in ("q_proj", "k_proj", "v_proj") else arch.include_bias
        total += i * o + (o if bias else 0)
    return total + 2 * arch.d_model


def param_count(arch: Architecture) -> int:
    """All parameters, a tied embedding/head counted once."""
    emb = arch.embedding_size * arch.d_model
    head = 0 if arch.weight_tying else emb + (arch.embedding_size if arch.include_bias else 0)
    return arch.n_layers * block_params(arch) + emb + head + arch.d_model


def largest_module_params(arch: Architecture) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers at once): the embedding or head,
    or an MLP projection."""
    d, f, v = arch.d_model, arch.mlp_hidden_size, arch.embedding_size
    return max(v * d + (v if arch.include_bias and not arch.weight_tying else 0), f * d + f * arch.include_bias)


@dataclass(frozen=True)
class LoraShape:
    """A LoRA adapter: rank, target layer names (:data:`~align.models.LLADA_LORA_TARGETS` for ``auto``; the
    output head is never a target) and dropout. PEFT keeps adapter weights in fp32 (``adapter_bytes``)."""

    r: int
    targets: tuple[str, ...]
    dropout: float = 0.0
    adapter_bytes: int = 4


def lora_param_count(arch: Architecture, lora: LoraShape) -> int:
    """Trainable LoRA parameters: ``r · (in + out)`` per targeted linear layer, in every block."""
    shapes = arch.linear_shapes()
    return arch.n_layers * sum(lora.r * sum(shapes[t]) for t in lora.targets if t in shapes)


# ------------------------------------------------------------------------------------------ activations
def activation_bytes_per_token(arch: Architecture, *, act_bytes: int, lora: LoraShape | None = None,
                               padded: bool = False, seq_len: int = 0, dropout_mask_bytes: int = 1) -> int:
    """Bytes one block keeps for the backward pass, per token (training forward, ``docs/distributed.md``).

    With ``c = act_bytes`` (2 for bf16/fp16, 4 for fp32), ``d``, ``kv`` (key width; ``d`` when a padding mask
    makes grouped-query attention repeat the key/value heads), ``f`` (MLP width) and ``H`` heads::

        both norms:  2·(4d + 4)            fp32 copy of the input and 1/rms, for the input gradient
        attention:   c·(2d + 2kv) + 4H     RoPE'd q and k, v, the output, the log-sum-exp (flash / SDPA)
        MLP:         3c·f                  gate, silu(gate), up
        full fine-tuning adds 4c·d + c·f:  the normalised inputs and norm outputs (weight gradients of the
                                           norms and projections) and silu(gate)·up (input of ff_out)
        LoRA adds, per targeted layer with input width i: a·r (lora_A output) plus, when the input is cast
            to the adapter's dtype or dropped out, its copy a·i (and the dropout mask, m·i); otherwise the
            shared input once per group (q/k/v, ff_proj/up_proj, ff_out; attn_out's is the attention output)
        padding mask: c·T (SDPA's additive copy of the mask, per layer)

    ``a = lora.adapter_bytes``, ``m = dropout_mask_bytes`` (1 on CUDA, the tensor's dtype size on the CPU).
    """
    d, f, H, c = arch.d_model, arch.mlp_hidden_size, arch.n_heads, act_bytes
    kv = d if padded and arch.n_kv_heads != arch.n_heads else arch.kv_dim
    total = 2 * (4 * d + 4) + c * (2 * d + 2 * kv) + 4 * H + 3 * c * f
    if padded:
        total += c * seq_len
    if lora is None:
        return total + 4 * c * d + c * f
    shapes, a = arch.linear_shapes(), lora.adapter_bytes
    copies = a != c or lora.dropout > 0
    groups: set[str] = set()
    for t in lora.targets:
        if t not in shapes:
            continue
        i = shapes[t][0]
        total += a * lora.r
        if copies:
            total += a * i + (dropout_mask_bytes * i if lora.dropout > 0 else 0)
        else:
            group = {"q_proj": "n", "k_proj": "n", "v_proj": "n", "ff_proj": "m", "up_proj": "m"}.get(t, t)
            if group != "attn_out" and group not in groups:
                groups.add(group)
                total += c * i
    return total


def checkpointed_bytes_per_token(arch: Architecture, *, act_bytes: int) -> int:
    """With gradient checkpointing a block keeps only its input, ``c·d`` per token."""
    return act_bytes * arch.d_model


def final_norm_bytes_per_token(arch: Architecture, *, act_bytes: int, trainable: bool) -> int:
    """The final norm: fp32 input copy and 1/rms (plus the normalised input when its weight trains)."""
    return 4 * arch.d_model + 4 + (act_bytes * arch.d_model if trainable else 0)


# ------------------------------------------------------------------------------------------ the estimate
@dataclass(frozen=True)
class RolloutShape:
    """One GRPO micro-batch: ``completions`` sequences of ``prompt_len + gen_length`` tokens.

    ``rows_per_completion``: masked views the estimator scores per completion (one_step 1, coupled 3,
    elbo and block ``num_samples``, trace ``num_views``); ``plans``: mask plans kept for the inner iterations;
    ``reference_copy``: a frozen copy of the weights is the KL reference (``beta > 0`` without LoRA).
    """

    completions: int
    prompt_len: int
    gen_length: int
    block_length: int
    rows_per_completion: int
    cache: str = "none"
    plans: int = 1
    scored_estimates: int = 1
    reference_copy: bool = False


@dataclass(frozen=True)
class MemoryRow:
    """One line of the estimate: bytes per GPU, a short explanation, and whether it counts in the total."""

    name: str
    bytes: float
    detail: str
    in_total: bool = True


@dataclass
class MemoryEstimate:
    """Rows of a per-GPU estimate (``rows``), the peak (``total``) and the model states alone."""

    rows: list[MemoryRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Peak bytes per GPU: the rows marked ``in_total`` (the larger of training and rollout for GRPO)."""
        return float(sum(r.bytes for r in self.rows if r.in_total))

    @property
    def model_states(self) -> float:
        """Weights, gradients, optimizer states and the ZeRO-3 gathered module: what DeepSpeed's estimator counts."""
        return float(sum(r.bytes for r in self.rows if r.name in MODEL_STATE_ROWS))

    def get(self, name: str) -> float:
        """Bytes of the row called ``name`` (0 when absent)."""
        return float(sum(r.bytes for r in self.rows if r.name == name))

    def table(self) -> str:
        """The rows as a text table in GiB (MiB when the total is under 1 GiB); rows outside the total are in
        parentheses."""
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", GIB / 1024)
        width = max(len(r.name) for r in self.rows) + 2
        lines = [f"  {'':<{width}}{unit:>9}"]
        for r in self.rows:
            shown = f"{r.bytes / size:9.2f}" if r.in_total else f"({r.bytes / size:.2f})".rjust(9)
            lines.append(f"  {r.name:<{width}}{shown}   {r.detail}")
        lines.append(f"  {'total':<{width}}{self.total / size:9.2f}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


MODEL_STATE_ROWS = ("weights", "gathered module (ZeRO-3)", "gradients", "optimizer states")


def human_count(n: float) -> str:
    """``8.02B``, ``167.77M``, ``889.73k``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def model_state_rows(arch: Architecture, *, world_size: int = 1, zero_stage: int | None = None,
                     weight_bytes: int = 2, mixed_precision: bool = True, lora: LoraShape | None = None
                     ) -> list[MemoryRow]:
    """Weights, gradients and AdamW states per GPU.

    ``zero_stage`` None: no DeepSpeed (DDP): weights at ``weight_bytes``, gradients and two moments in the
    trainable parameters' dtype (LoRA adapters are fp32), no master copy. With DeepSpeed (stage 0-3) and
    ``mixed_precision`` (bf16/fp16): 16-bit weights, 16-bit gradients, fp32 gradients, fp32 master weights and
    two fp32 moments, partitioned over ``world_size`` as the stage says (optimizer states from stage 1,
    gradients from 2, weights at 3, where one module at a time is gathered whole with its gradient); without
    mixed precision, fp32 weights, gradients and moments.
    """
    n = max(1, world_size)
    total = param_count(arch)
    trainable = lora_param_count(arch, lora) if lora else total
    ds = zero_stage is not None
    s = zero_stage or 0
    every = f"{human_count(total)} params"
    if not ds:
        tb = lora.adapter_bytes if lora else weight_bytes
        weights = weight_bytes * total + (tb * trainable if lora else 0)
        extra = f" + LoRA {human_count(trainable)} x {tb} B" if lora else ""
        return [MemoryRow("weights", weights, f"{every} x {weight_bytes} B{extra}"),
                MemoryRow("gradients", tb * trainable, f"{human_count(trainable)} trainable x {tb} B"),
                MemoryRow("optimizer states", 2 * tb * trainable, f"AdamW: 2 moments x {tb} B, no master copy")]
    wb = 2 if mixed_precision else 4
    p_total = total + (trainable if lora else 0)
    rows = [MemoryRow("weights", wb * p_total / (n if s == 3 else 1),
                      f"{human_count(p_total)} params x {wb} B" + (f" / {n} GPUs" if s == 3 and n > 1 else ""))]
    if s == 3:
        big = largest_module_params(arch)
        rows.append(MemoryRow("gathered module (ZeRO-3)", 4 * big, f"largest module {human_count(big)} params x 2 B "
                                                                   "weights + 2 B gradients"))
    part = f" / {n} GPUs" if n > 1 else ""
    if mixed_precision:
        g16 = 0 if s == 3 else 2 * trainable / (n if s >= 2 else 1)
        g32 = 4 * trainable / (n if s >= 1 else 1)
        g16_text = "16-bit ones reduced in buckets" if s == 3 else f"2 B 16-bit{part if s >= 2 else ''}"
        rows.append(MemoryRow("gradients", g16 + g32, f"{human_count(trainable)} trainable x (4 B fp32"
                              f"{part if s >= 1 else ''}; {g16_text})"))
        rows.append(MemoryRow("optimizer states", 12 * trainable / (n if s >= 1 else 1), "fp32 master + 2 fp32 "
                              f"moments = 12 B x {human_count(trainable)}{part if s >= 1 else ''}"))
    else:
        rows.append(MemoryRow("gradients", 4 * trainable / (n if s >= 2 else 1), f"{human_count(trainable)} x 4 B"
                              f"{part if s >= 2 else ''}"))
        rows.append(MemoryRow("optimizer states", 8 * trainable / (n if s >= 1 else 1),
                              f"2 fp32 moments = 8 B x {human_count(trainable)}{part if s >= 1 else ''}"))
    return rows


def estimate_memory(arch: Architecture, *, sequences: int, seq_len: int, head_positions: int,
                    world_size: int = 1, zero_stage: int | None = None, weight_bytes: int = 2,
                    mixed_precision: bool = True, act_bytes: int | None = None, lora: LoraShape | None = None,
                    gradient_checkpointing: bool = False, padded: bool = False, rollout: RolloutShape | None = None,
                    head_chunk: int | None = None, dropout_mask_bytes: int = 1) -> MemoryEstimate:
    """Per-GPU peak of one training micro-batch (``docs/distributed.md``, "Memory estimate").

    Args:
        sequences, seq_len: rows through the network per micro-batch and their (padded) length; for GRPO,
            completions × ``rows_per_completion`` rows of ``prompt_len + gen_length``.
        head_positions: positions whose logits the loss needs (SFT: masked response tokens, at most).
        head_chunk: the head is applied this many positions at a time and recomputed in backward (GRPO's
            log-probabilities); None keeps all logits (SFT's cross-entropy).
        act_bytes: activation dtype size (default: 2 with DeepSpeed mixed precision, else ``weight_bytes``).
        rollout: the GRPO rollout of this micro-batch (sampler working set, KV cache, buffers).
        Other arguments: see :func:`model_state_rows` and :func:`activation_bytes_per_token`.
    """
    c = act_bytes or (2 if zero_stage is not None and mixed_precision else weight_bytes)
    est = MemoryEstimate(model_state_rows(arch, world_size=world_size, zero_stage=zero_stage,
                                          weight_bytes=weight_bytes, mixed_precision=mixed_precision, lora=lora))
    tokens = sequences * seq_len
    layer = activation_bytes_per_token(arch, act_bytes=c, lora=lora, padded=padded, seq_len=seq_len,
                                       dropout_mask_bytes=dropout_mask_bytes)
    norm = final_norm_bytes_per_token(arch, act_bytes=c, trainable=lora is None)
    full = tokens * (arch.n_layers * layer + norm)
    v = arch.vocab_size
    if head_chunk is None:
        head = MemoryRow("output head", head_positions * (12 * v + c * arch.d_model),
                         f"{head_positions} positions x 12 B x {v} vocab (logits, log-softmax and its gradient)")
    else:
        alive = min(head_positions, head_chunk)
        head = MemoryRow("output head", head_positions * (c * arch.d_model + 12) + alive * 12 * v,
                         f"{head_positions} positions, {alive} x 12 B x {v} vocab at a time (recomputed)")
    # With checkpointing, a layer is recomputed in the backward pass after the head's buffers are freed: the
    # peak holds the larger of the two, so the recomputed layer counts only beyond the head.
    recompute = max(0.0, tokens * layer - head.bytes)
    ckpt = tokens * (arch.n_layers * checkpointed_bytes_per_token(arch, act_bytes=c) + norm) + recompute
    shape = f"{sequences} x {seq_len} tokens"
    act = [MemoryRow("activations (checkpointing on)", ckpt, f"{shape}: {arch.n_layers} layers x {c * arch.d_model}"
                     f" B/token; a layer recomputed in backward ({layer / 1024:.1f} KiB/token) counts beyond the "
                     "output head", gradient_checkpointing),
           MemoryRow("activations (checkpointing off)", full, f"{shape}: {arch.n_layers} layers x "
                     f"{layer / 1024:.1f} KiB/token", not gradient_checkpointing)]
    if rollout is None:
        est.rows += [*act, head]
        return est
    ro = rollout
    if ro.reference_copy:
        est.rows.append(MemoryRow("reference model", weight_bytes * param_count(arch), "frozen copy for the KL term"))
    T = ro.prompt_len + ro.gen_length
    rows = ro.completions * ro.rows_per_completion
    buffers = ro.completions * T * 16 + ro.plans * rows * T * 5 + ro.scored_estimates * (ro.completions + rows) * T * 4
    est.rows.append(MemoryRow("rollout buffers", buffers, f"ids, masks and {ro.plans} mask plan(s) of {rows} rows"))
    train_peak = sum(r.bytes for r in act if r.in_total) + head.bytes
    kv = 0 if ro.cache == "none" else arch.n_layers * 2 * ro.completions * T * arch.kv_dim * c
    work = ro.completions * T * (c * (3 * arch.d_model + 3 * arch.mlp_hidden_size) + 8 * arch.d_model)
    logits = ro.completions * ro.block_length * 12 * v
    sampler = kv + work + logits
    sampling_peak = sampler > train_peak
    for r in act:
        est.rows.append(MemoryRow(r.name, r.bytes, r.detail, r.in_total and not sampling_peak))
    est.rows.append(MemoryRow("output head", head.bytes, head.detail, not sampling_peak))
    est.rows.append(MemoryRow("rollout sampling", sampler, f"{ro.completions} x {T} tokens, no gradients"
                              + (f"; {ro.cache} KV cache {kv / GIB:.2f} GiB" if kv else ""), sampling_peak))
    if sampling_peak:
        est.notes.append("the rollout, not the update, sets the peak")
    return est

