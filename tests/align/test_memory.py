"""The memory estimator: parameter counts, the per-token activation formulas against what autograd saves, and the
model-state figures against DeepSpeed's own estimator."""

import contextlib
import io
import re

import pytest
import torch

from align.memory import (
    LoraShape,
    activation_bytes_per_token,
    architecture_from_config,
    checkpointed_bytes_per_token,
    estimate_memory,
    largest_module_params,
    lora_param_count,
    model_state_rows,
    param_count,
    released_architecture,
)
from align.models import LLADA_LORA_TARGETS, LLaDAModelLM, llada_8b_config, tiny_llada_config
from align.models.llada import rope_cos_sin

SHAPES = [
    {},
    {"n_kv_heads": 2},
    {"weight_tying": True},
    {"include_bias": True, "mlp_hidden_size": 96},
]


@pytest.mark.parametrize("overrides", SHAPES)
def test_parameter_counts_match_the_model(overrides):
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = LLaDAModelLM(tiny_llada_config(**overrides))
    arch = architecture_from_config(model.config)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())
    assert largest_module_params(arch) == model_to_params(model)[1]


def test_released_shapes_have_the_published_sizes():
    llada = released_architecture("GSAI-ML/LLaDA-8B-Instruct")
    illada = released_architecture("GSAI-ML/iLLaDA-8B-Base")
    assert param_count(llada) == 8_015_581_184                   # 8.02B (model card)
    assert round(param_count(illada) / 1e9, 2) == 7.62           # 7.62B, tied embedding (model card)
    assert illada.kv_dim == 1024 and illada.weight_tying
    assert released_architecture("someone/else") is None


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model

    model = LLaDAModelLM(tiny_llada_config(n_kv_heads=2))
    arch = architecture_from_config(model.config)
    lora = LoraShape(8, tuple(LLADA_LORA_TARGETS))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(LLADA_LORA_TARGETS),
                                                  exclude_modules=["model.transformer.ff_out"]))
    assert lora_param_count(arch, lora) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _saved_bytes_per_token(dtype, *, lora=None, padded=False, checkpointing=False, **overrides):
    """Bytes of the distinct tensors autograd saves during one block's forward, per token (parameters and the
    tensors all layers share, RoPE tables and the mask, left out)."""
    from peft import LoraConfig, get_peft_model
    from transformers.masking_utils import create_bidirectional_mask

    torch.manual_seed(0)
    config = tiny_llada_config(d_model=64, n_heads=4, mlp_hidden_size=192, n_layers=1, **overrides)
    model = LLaDAModelLM(config).to(dtype).train()
    if lora is not None:
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_dropout=lora.dropout, target_modules=list(lora.targets),
                                                 exclude_modules=["model.transformer.ff_out"]))
    base = model.get_base_model() if lora is not None else model
    if checkpointing:
        base.gradient_checkpointing_enable()
    block = base.model.transformer.blocks[0]
    B, T = 2, 24
    x = torch.randn(B, T, config.d_model, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), config.head_dim, config.rope_theta)
    mask = None
    if padded:
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[0, :3] = False
        mask = create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=keep)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (cos, sin, mask) if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos=cos, sin=sin, attention_mask=mask)
    return sum(seen.values()) / (B * T), architecture_from_config(config), T


ALL = tuple(LLADA_LORA_TARGETS)


@pytest.mark.parametrize("dtype,lora,padded,overrides", [
    (torch.float32, None, False, {}),
    (torch.bfloat16, None, False, {}),
    (torch.bfloat16, None, False, {"n_kv_heads": 2}),
    (torch.bfloat16, None, True, {"n_kv_heads": 2}),           # a padding mask makes SDPA repeat the k/v heads
    (torch.float32, None, True, {}),
    (torch.bfloat16, LoraShape(8, ALL), False, {}),             # adapter inputs cast to fp32
    (torch.bfloat16, LoraShape(8, ALL, dropout=0.05), False, {}),
    (torch.float32, LoraShape(16, ALL), False, {}),             # no cast, no dropout: inputs shared per group
    (torch.float32, LoraShape(8, ("q_proj", "ff_out"), dropout=0.1), False, {"n_kv_heads": 2}),
])
def test_activation_formula_matches_what_autograd_saves(dtype, lora, padded, overrides):
    measured, arch, T = _saved_bytes_per_token(dtype, lora=lora, padded=padded, **overrides)
    c = 2 if dtype == torch.bfloat16 else 4
    # on the CPU a dropout mask has the tensor's dtype (fp32 adapter inputs); on CUDA it is one byte
    formula = activation_bytes_per_token(arch, act_bytes=c, lora=lora, padded=padded, seq_len=T, dropout_mask_bytes=4)
    assert measured == formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpointed_block_keeps_only_its_input(dtype):
    measured, arch, _ = _saved_bytes_per_token(dtype, checkpointing=True)
    assert measured == checkpointed_bytes_per_token(arch, act_bytes=2 if dtype == torch.bfloat16 else 4)


def _deepspeed_per_gpu_gib(fn, line_options: str, **kwargs) -> float:
    """Run one of DeepSpeed's ``*_all_cold`` estimators and read the per-GPU figure of the row without offload."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(**kwargs)
    for line in out.getvalue().splitlines():
        if line.rstrip().endswith(line_options):
            return float(re.findall(r"([\d.]+)GB", line)[1])
    raise AssertionError(f"no row {line_options!r} in:\n{out.getvalue()}")


@pytest.fixture(scope="module")
def llada_8b_shapes():
    """Total and largest-module parameters of LLaDA-8B, from the model built on the meta device."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    with torch.device("meta"):
        model = LLaDAModelLM(llada_8b_config())
    total = sum(p.numel() for p in model.parameters())   # meta tensors share a null data_ptr: count directly
    return total, model_to_params(model)[1], architecture_from_config(model.config)


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_agree_with_deepspeed_zero2(llada_8b_shapes, gpus, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    total, _, arch = llada_8b_shapes
    assert param_count(arch) == total
    ds = _deepspeed_per_gpu_gib(estimate_zero2_model_states_mem_needs_all_cold, "offload_optimizer=none",
                                total_params=total, num_gpus_per_node=gpus, num_nodes=nodes)
    mine = sum(r.bytes for r in model_state_rows(arch, world_size=gpus * nodes, zero_stage=2)) / 2**30
    assert abs(mine - ds) / ds < 0.10, (mine, ds)


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_agree_with_deepspeed_zero3(llada_8b_shapes, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    total, largest, arch = llada_8b_shapes
    assert largest_module_params(arch) == largest
    ds = _deepspeed_per_gpu_gib(estimate_zero3_model_states_mem_needs_all_cold,
                                "offload_param=none, offload_optimizer=none, zero_init=1", total_params=total,
                                largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes)
    est = estimate_memory(arch, sequences=1, seq_len=16, head_positions=16, world_size=gpus * nodes, zero_stage=3)
    assert abs(est.model_states / 2**30 - ds) / ds < 0.10, (est.model_states / 2**30, ds)


def test_estimate_switches_with_checkpointing_and_lora():
    arch = released_architecture("GSAI-ML/LLaDA-8B-Base")
    kw = {"sequences": 4, "seq_len": 2048, "head_positions": 4096}
    plain = estimate_memory(arch, **kw)
    ckpt = estimate_memory(arch, gradient_checkpointing=True, **kw)
    assert plain.total == sum(r.bytes for r in plain.rows if r.in_total)
    saved = plain.get("activations (checkpointing off)") - ckpt.get("activations (checkpointing on)")
    assert plain.total - ckpt.total == pytest.approx(saved)
    lora = estimate_memory(arch, lora=LoraShape(64, ALL), **kw)
    assert lora.get("optimizer states") == pytest.approx(8 * lora_param_count(arch, LoraShape(64, ALL)))
    # bf16 weights without DeepSpeed: AdamW keeps two bf16 moments and no master copy
    assert plain.get("optimizer states") == 2 * 2 * param_count(arch)
