"""Tests of the denoiser adapters (Dream-style shift, generic masked LM) and load_denoiser."""

import json

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from align.models import (
    Denoiser,
    DreamAdapter,
    LLaDAModelLM,
    MaskedLMAdapter,
    check_lora_targets,
    load_denoiser,
    lora_target_modules,
    shift_right,
)

VOCAB = 64
MASK = 63


def seeded(factory, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory().eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return seeded(lambda: Qwen2ForCausalLM(config))


def tiny_bert() -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return seeded(lambda: BertForMaskedLM(config))


def random_ids(bsz: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (bsz, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dream_adapter_hidden_states_head_and_shift(impl):
    model = tiny_qwen2()
    model.config._attn_implementation = impl
    adapter = DreamAdapter(model, mask_token_id=MASK)
    ids = random_ids(2, 7)
    with torch.no_grad():
        full = model(ids).logits  # the model itself, now bidirectional: logit at i predicts i+1
        h = adapter.hidden_states(ids)
        aligned = adapter(ids).logits
    torch.testing.assert_close(h, model.model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(adapter.head(h), full)
    # Token i is scored by the output computed at i-1; position 0 keeps its own.
    torch.testing.assert_close(aligned[:, 1:], full[:, :-1])
    torch.testing.assert_close(aligned[:, 0], full[:, 0])
    torch.testing.assert_close(shift_right(adapter.head(h)), aligned)
    torch.testing.assert_close(adapter.head(shift_right(h)), aligned)
    assert adapter.shift_logits and adapter.mask_token_id == MASK and isinstance(adapter, Denoiser)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dream_adapter_is_bidirectional(impl):
    model = tiny_qwen2()
    model.config._attn_implementation = impl
    adapter = DreamAdapter(model, mask_token_id=MASK)
    ids = random_ids(1, 6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % (VOCAB - 1)
    with torch.no_grad():
        a, b = adapter.hidden_states(ids), adapter.hidden_states(changed)
    # Under a causal mask position 0 could not see the last token.
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_dream_adapter_left_padding_matches_unpadded():
    adapter = DreamAdapter(tiny_qwen2(), mask_token_id=MASK)
    ids = random_ids(1, 5)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref, ref_h = adapter(ids).logits, adapter.hidden_states(ids)
        out, out_h = adapter(padded, attention_mask=mask).logits, adapter.hidden_states(padded, mask)
    torch.testing.assert_close(out_h[:, 2:], ref_h)
    # In the aligned logits, the first real token reads a padding output; the others must match.
    torch.testing.assert_close(out[:, 3:], ref[:, 1:])


def test_dream_adapter_lora_targets():
    adapter = DreamAdapter(tiny_qwen2(), mask_token_id=MASK)
    targets = adapter.lora_target_modules()
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_target_modules(adapter) == targets
    assert check_lora_targets(adapter.model, targets)["o_proj"] == 2


def test_masked_lm_adapter_matches_full_forward():
    model = tiny_bert()
    adapter = MaskedLMAdapter(model, mask_token_id=MASK)
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        h = adapter.hidden_states(ids, attention_mask=mask)
    assert h.shape == (2, 9, 32) and not adapter.shift_logits
    torch.testing.assert_close(adapter.head(h), full)
    torch.testing.assert_close(adapter.head(h[:, [2, 5]]), full[:, [2, 5]])
    assert "query" in adapter.lora_target_modules() and "decoder" not in adapter.lora_target_modules()


def test_masked_lm_adapter_errors():
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedLMAdapter(tiny_bert())
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedLMAdapter(tiny_bert(), mask_token_id=VOCAB)
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match="head="):
        MaskedLMAdapter(distil, mask_token_id=MASK)


def test_load_denoiser_dream_checkpoint_without_remote_code(tmp_path):
    reference = DreamAdapter(tiny_qwen2(), mask_token_id=MASK)
    reference.model.save_pretrained(tmp_path)
    dream_config = {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "mask_token_id": MASK,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
        "max_window_layers": 2,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    (tmp_path / "config.json").write_text(json.dumps(dream_config))
    loaded = load_denoiser(tmp_path)
    assert isinstance(loaded, DreamAdapter) and loaded.mask_token_id == MASK
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_load_denoiser_masked_lm_takes_mask_id_from_tokenizer(tmp_path, save_word_tokenizer):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, VOCAB, "[MASK]")  # "[MASK]" is id VOCAB - 1 == MASK
    loaded = load_denoiser(tmp_path)
    assert isinstance(loaded, MaskedLMAdapter) and loaded.mask_token_id == MASK
    ids = random_ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(input_ids=ids).logits)


def test_load_denoiser_llada_and_kind_checks(tmp_path, make_tiny_llada):
    make_tiny_llada(vocab_size=VOCAB).save_pretrained(tmp_path)
    loaded = load_denoiser(tmp_path)
    assert isinstance(loaded, LLaDAModelLM) and isinstance(loaded, Denoiser)
    assert loaded.supports_kv_context and not loaded.shift_logits
    assert load_denoiser(tmp_path, kind="llada", mask_token_id=4).mask_token_id == 4
    with pytest.raises(ValueError, match="kind"):
        load_denoiser(tmp_path, kind="causal")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_denoiser(empty)
