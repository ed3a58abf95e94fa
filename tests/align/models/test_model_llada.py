"""Tests of the native LLaDA model, its config and its loaders (tiny configs, CPU)."""

import functools
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from align.models import (
    LLaDAConfig,
    LLaDAModelLM,
    check_lora_targets,
    llada_8b_config,
    load_model,
    load_model_and_tokenizer,
    lora_exclude_modules,
    lora_target_modules,
    tiny_llada_config,
)

VOCAB = 96


@pytest.fixture(scope="module")
def build(make_tiny_llada):
    """``build(seed=0, **overrides)``: tiny model of vocabulary VOCAB with deterministic init (conftest)."""
    return functools.partial(make_tiny_llada, vocab_size=VOCAB)


def random_ids(bsz: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 2, (bsz, seq_len), generator=gen)


# Released LLaDA-8B-Instruct config.json field set, with tiny sizes.
RELEASED_STYLE = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 32,
    "embedding_dropout": 0.0,
    "embedding_size": VOCAB,
    "eos_token_id": 90,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 95,
    "max_sequence_length": 64,
    "mlp_hidden_size": 48,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 2,
    "pad_token_id": 90,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": VOCAB,
    "weight_tying": False,
}


def test_8b_meta_state_dict_matches_released_names_and_shapes():
    cfg = llada_8b_config()
    with torch.device("meta"):
        model = LLaDAModelLM(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    d, f, e = 4096, 12288, 126464
    expected = {
        "model.transformer.wte.weight": (e, d),
        "model.transformer.ln_f.weight": (d,),
        "model.transformer.ff_out.weight": (e, d),
    }
    for i in range(32):
        p = f"model.transformer.blocks.{i}."
        expected.update(
            {
                p + "attn_norm.weight": (d,),
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (d, d),
                p + "v_proj.weight": (d, d),
                p + "attn_out.weight": (d, d),
                p + "ff_norm.weight": (d,),
                p + "ff_proj.weight": (f, d),
                p + "up_proj.weight": (f, d),
                p + "ff_out.weight": (d, f),
            }
        )
    assert shapes == expected
    released = {
        "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
        "vocab_size": 126464, "embedding_size": 126464, "max_sequence_length": 4096, "rope": True,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "block_type": "llama",
        "activation_type": "silu", "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
        "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "use_cache": False,
    }  # fmt: skip
    assert {k: getattr(cfg, k) for k in released} == released
    assert model.mask_token_id == 126336 and llada_8b_config(mask_token_id=5).mask_token_id == 5


def test_forward_shapes_and_hidden_states_plus_head_equal_logits(build):
    model = build(embedding_size=VOCAB + 8)  # padded embedding rows are dropped from the logits
    ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(ids).logits
        h = model.hidden_states(ids)
        assert logits.shape == (2, 9, VOCAB) and h.shape == (2, 9, 64)
        torch.testing.assert_close(model.head(h), logits)
        sel = torch.tensor([0, 4, 8])
        torch.testing.assert_close(model.head(h[:, sel]), logits[:, sel])
        torch.testing.assert_close(model(ids, logits_to_keep=sel).logits, logits[:, sel])


def test_scale_logits_divides_by_sqrt_d_model(build):
    ids = random_ids(1, 4)
    with torch.no_grad():
        plain, scaled = build()(ids).logits, build(scale_logits=True)(ids).logits
    torch.testing.assert_close(scaled, plain / 8.0)


def test_attention_is_bidirectional(build):
    model = build()
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % (VOCAB - 2)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_left_padding_is_invariant(build):
    model = build()
    ids = random_ids(2, 7)
    padded = torch.cat([torch.full((2, 3), 90), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 7)], dim=1).long()
    with torch.no_grad():
        ref = model(ids).logits
        for impl in ("sdpa", "eager"):
            model.config._attn_implementation = impl
            torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], ref)


def test_default_positions_come_from_the_attention_mask(monkeypatch, build):
    import align.models.llada as llada

    seen = []
    original = llada.rope_cos_sin
    monkeypatch.setattr(llada, "rope_cos_sin", lambda pos, *a: seen.append(pos.clone()) or original(pos, *a))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        build()(random_ids(2, 5), attention_mask=mask)
    torch.testing.assert_close(seen[0], torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))


def test_sdpa_and_eager_agree_with_gqa(build):
    model = build(n_heads=4, n_kv_heads=2)
    block = model.model.transformer.blocks[0]
    assert block.k_proj.weight.shape == (2 * 16, 64) and block.q_proj.weight.shape == (64, 64)
    ids = random_ids(2, 8)
    with torch.no_grad():
        sdpa = model(ids).logits
        model.config._attn_implementation = "eager"
        eager = model(ids).logits
        _, kv = model.hidden_states(ids, return_kv=True)
    torch.testing.assert_close(sdpa, eager)
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, 8, 16) and kv[0][1].shape == (2, 2, 8, 16)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_context_kv_equals_full_pass(impl, build):
    model = build(n_kv_heads=2)
    model.config._attn_implementation = impl
    ids = random_ids(2, 12)
    with torch.no_grad():
        full, kv = model.hidden_states(ids, return_kv=True)
        # Prefix cache: context = first 5 positions, queries = the rest.
        ctx = [(k[:, :, :5], v[:, :, :5]) for k, v in kv]
        h = model.hidden_states(ids[:, 5:], position_ids=torch.arange(5, 12), context_kv=ctx)
        torch.testing.assert_close(h, full[:, 5:])
        # Dual cache: queries in the middle, context on both sides, with a context mask of ones.
        q, c = torch.tensor([4, 5, 6]), torch.tensor([0, 1, 2, 3, 7, 8, 9, 10, 11])
        ctx = [(k[:, :, c], v[:, :, c]) for k, v in kv]
        h, own = model.hidden_states(
            ids[:, q], position_ids=q, context_kv=ctx, context_mask=torch.ones(2, 9), return_kv=True
        )
        torch.testing.assert_close(h, full[:, q])
        torch.testing.assert_close(own[1][0], kv[1][0][:, :, q])


def test_context_mask_hides_context_positions(build):
    model = build()
    ids = random_ids(1, 8)
    with torch.no_grad():
        _, kv = model.hidden_states(ids, return_kv=True)
        ctx = [(k[:, :, :4], v[:, :, :4]) for k, v in kv]
        hidden = model.hidden_states(
            ids[:, 4:], position_ids=torch.arange(4, 8), context_kv=ctx, context_mask=torch.zeros(1, 4)
        )
        alone = model.hidden_states(ids[:, 4:], position_ids=torch.arange(4, 8))
    torch.testing.assert_close(hidden, alone)


def test_context_kv_errors(build):
    model = build()
    ids = random_ids(1, 6)
    with torch.no_grad():
        _, kv = model.hidden_states(ids, return_kv=True)
    with pytest.raises(ValueError, match="position_ids"):
        model.hidden_states(ids, context_kv=kv)
    with pytest.raises(ValueError, match="layers"):
        model.hidden_states(ids, position_ids=torch.arange(6), context_kv=kv[:1])


def test_gradient_checkpointing_gives_same_gradients(monkeypatch, build):
    import align.models.llada as llada

    calls = []
    original = llada.apply_rope
    monkeypatch.setattr(llada, "apply_rope", lambda *a: calls.append(1) or original(*a))
    ids = random_ids(2, 8)
    grads, n_calls = [], []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        n_calls.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert n_calls == [4, 8]  # q and k per block; checkpointing recomputes each block in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_save_and_load_round_trip_sharded(tmp_path, build):
    model = build(n_kv_heads=2, include_qkv_bias=True)
    ids = random_ids(2, 6)
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    for loaded in (
        load_model(tmp_path),
        AutoModelForMaskedLM.from_pretrained(tmp_path),
        AutoModel.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, LLaDAModelLM)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref)
    assert load_model(tmp_path, mask_token_id=5).mask_token_id == 5
    assert load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_weight_tying_round_trip(tmp_path, build):
    model = build(weight_tying=True)
    tr = model.model.transformer
    assert tr.ff_out.weight is tr.wte.weight
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    tr2 = loaded.model.transformer
    assert tr2.ff_out.weight is tr2.wte.weight
    torch.testing.assert_close(tr2.wte.weight, tr.wte.weight)


def write_released_style_dir(path, config=RELEASED_STYLE):
    """A directory laid out like a released checkpoint: raw config.json, sharded bf16 safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LLaDAModelLM(LLaDAConfig(**{k: v for k, v in config.items() if k != "auto_map"}))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def test_released_style_checkpoint_loads_without_remote_code(tmp_path):
    source = write_released_style_dir(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, LLaDAConfig) and not hasattr(config, "auto_map")
    model = load_model(tmp_path)
    assert model.dtype == torch.bfloat16 and model.mask_token_id == 95
    auto = AutoModelForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = random_ids(1, 5)
    with torch.no_grad():
        expected = source.to(torch.bfloat16).float()(ids).logits
        torch.testing.assert_close(auto(ids).logits, expected)
    auto.save_pretrained(tmp_path / "resaved")
    # the released transformers-4 pointer (modeling_llada) is not carried over: the re-saved checkpoint
    # points at the modules saved beside it
    from align.models.configuration_llada import LLADA_AUTO_MAP

    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"] == LLADA_AUTO_MAP


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alibi", True),
        ("block_type", "sequential"),
        ("layer_norm_type", "default"),
        ("rope", False),
        ("attention_layer_norm", True),
        ("activation_type", "swiglu"),
        ("block_group_size", 2),
        ("clip_qkv", 8.0),
        ("layer_norm_with_affine", False),
        ("init_fn", "xavier"),
    ],
)
def test_unsupported_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_llada_config(**{field: value})


def test_inconsistent_config_values_raise():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_llada_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="multi_query_attention"):
        tiny_llada_config(n_kv_heads=4, multi_query_attention=True)
    with pytest.raises(ValueError, match="embedding_size"):
        tiny_llada_config(embedding_size=10)
    with pytest.raises(ValueError, match="mask_token_id"):
        tiny_llada_config(mask_token_id=10_000)
    assert tiny_llada_config(n_kv_heads=None, multi_query_attention=True).n_kv_heads == 1
    assert LLaDAConfig(mlp_hidden_size=None, d_model=64, n_heads=4, mlp_ratio=2).mlp_hidden_size == 128


def test_unsupported_value_in_checkpoint_names_path_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_STYLE, "alibi": True}))
    with pytest.raises(ValueError, match=r"config\.json.*alibi"):
        load_model(tmp_path)


def test_missing_directory_or_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="load_denoiser"):
        load_model(tmp_path)


def test_checkpoint_with_wrong_names_is_rejected(tmp_path):
    write_released_style_dir(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("attn_out", "o_proj"): v for k, v in index["weight_map"].items()}
    for file in set(index["weight_map"].values()):
        from safetensors.torch import load_file

        tensors = load_file(str(tmp_path / file))
        save_file({k.replace("attn_out", "o_proj"): v for k, v in tensors.items()}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing keys.*attn_out"):
        load_model(tmp_path)


def test_load_model_and_tokenizer(tmp_path, build, save_word_tokenizer):
    save_word_tokenizer(tmp_path, VOCAB, "<mask>")
    build().save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(tmp_path)
    assert tokenizer.mask_token_id == model.mask_token_id == VOCAB - 1
    assert tokenizer("w3 w5")["input_ids"] == [3, 5]


def test_mask_token_id_override_is_validated(build):
    model = build()
    model.mask_token_id = 3
    assert model.mask_token_id == 3 and model.config.mask_token_id == 3
    with pytest.raises(ValueError, match="mask_token_id"):
        model.mask_token_id = VOCAB


def test_lora_targets_and_pitfall_names(build):
    model = build()
    targets = lora_target_modules(model)
    assert targets == ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    counts = check_lora_targets(model, targets)
    assert counts["ff_out"] == 2 + 1  # two blocks plus the output head
    assert counts["q_proj"] == 2
    with pytest.raises(ValueError, match=r"o_proj.*gate_proj.*down_proj"):
        check_lora_targets(model, ["q_proj", "o_proj", "gate_proj", "down_proj"])
    with pytest.warns(UserWarning, match="o_proj"):
        check_lora_targets(model, ["o_proj"], strict=False)
    assert check_lora_targets(model, r".*blocks\.0\.q_proj") == {r".*blocks\.0\.q_proj": 1}
    assert lora_exclude_modules(model) == ["model.transformer.ff_out"]


def test_peft_lora_with_exclusion_leaves_output_head_alone(build):
    from peft import LoraConfig, get_peft_model

    model = build()
    config = LoraConfig(r=2, target_modules=lora_target_modules(model), exclude_modules=lora_exclude_modules(model))
    peft_model = get_peft_model(model, config)
    names = {n for n, _ in peft_model.named_modules()}
    assert any(n.endswith("blocks.1.ff_out.lora_A") for n in names)
    assert any(n.endswith("blocks.0.attn_out.lora_A") for n in names)
    assert not any(n.endswith("transformer.ff_out.lora_A") for n in names)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(param, 0.01)
    ids = random_ids(1, 5)
    with torch.no_grad():
        tuned = peft_model.head(peft_model.hidden_states(ids))
        torch.testing.assert_close(peft_model(input_ids=ids).logits, tuned)
        with peft_model.disable_adapter():
            base = peft_model.head(peft_model.hidden_states(ids))
    assert not torch.allclose(tuned, base)
    torch.testing.assert_close(base, build()(ids).logits)


def test_forward_logits_mask_selects_positions(make_tiny_llada):
    model = make_tiny_llada()  # tiny_llada_config() defaults: vocabulary 256
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    sel = torch.zeros(2, 9, dtype=torch.bool)
    sel[0, 3] = sel[1, 0] = sel[1, 8] = True
    full = model(ids).logits
    part = model(ids, logits_mask=sel).logits
    assert part.shape == (3, full.shape[-1])
    torch.testing.assert_close(part, full[sel])
    with pytest.raises(ValueError, match="logits_mask"):
        model(ids, logits_mask=sel[:, :4])


def test_forward_return_hidden_matches_hidden_states(make_tiny_llada):
    model = make_tiny_llada()  # tiny_llada_config() defaults: vocabulary 256
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(2))
    out = model(ids, return_hidden=True)
    assert out.logits is None
    torch.testing.assert_close(out.hidden_states[0], model.hidden_states(ids))
