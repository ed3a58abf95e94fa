"""Every denoiser kind from a recipe (``model.adapter``) and from ``dlm-align generate --adapter``.

Tiny checkpoints of each kind (native LLaDA, a Qwen2-architecture Dream-style model, a BERT masked LM) are
sized for the built-in arithmetic tokenizer (mask id 5, EOS/pad 0); each goes through SFT, GRPO and
evaluation with the CLI, then ``generate``. Settings an adapter cannot honour are rejected before training.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM, Qwen2Config, Qwen2ForCausalLM

from align.build import build_model, build_model_and_tokenizer
from align.cli import main
from align.config import ConfigError, ModelConfig, config_from_dict
from align.likelihood import elbo
from align.models import LLaDAConfig, LLaDAModelLM, load_tokenizer
from align.models.adapters import DreamAdapter, MaskedLMAdapter, detect_denoiser_kind, load_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = 5  # the arithmetic tokenizer's mask id
CLASSES = {"llada": LLaDAModelLM, "dream": DreamAdapter, "masked_lm": MaskedLMAdapter}


def _seeded(factory):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory()


def _dream_config(vocab: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, eos_token_id=0, pad_token_id=0)


def _save_dream(path: Path, vocab: int, tokenizer) -> None:
    """A Dream-style checkpoint as Dream ships it: Qwen2 weights, ``model_type: Dream``, remote-code auto_map."""
    _seeded(lambda: Qwen2ForCausalLM(_dream_config(vocab))).save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=MASK,
               auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"})
    (path / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_init_config) -> dict[str, Path]:
    """One tiny checkpoint per kind. The BERT one has no tokenizer files and no mask id in its config: a recipe
    names the tokenizer, whose mask token it then uses."""
    tokenizer = load_tokenizer("builtin:arithmetic")
    vocab = len(tokenizer)
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {kind: root / kind for kind in CLASSES}
    llada = LLaDAConfig(**tiny_init_config(vocab_size=vocab, embedding_size=vocab))
    _seeded(lambda: LLaDAModelLM(llada)).save_pretrained(paths["llada"])
    tokenizer.save_pretrained(paths["llada"])
    _save_dream(paths["dream"], vocab, tokenizer)
    bert = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=0)
    _seeded(lambda: BertForMaskedLM(bert)).save_pretrained(paths["masked_lm"])
    return paths


def _recipe(tmp_path: Path, model: dict, **top) -> dict:
    sampler = {"gen_length": 8, "denoising_steps": 8, "block_length": 8}
    return {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["sft", "grpo"], "model": model,
            "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 4, "seed": 0},
                     "max_length": 128},
            "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
            "grpo": {**sampler, "estimator": "coupled", "num_generations": 2, "temperature": 1.0, "beta": 0.04,
                     "rewards": [{"name": "task_accuracy"}], "per_device_train_batch_size": 4, "max_steps": 2,
                     "learning_rate": 1e-2, "logging_steps": 1},
            "eval": {**sampler, "num_problems": 4, "batch_size": 4}, **top}


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("kind,model,top", [
    ("llada", {"adapter": "llada"}, {}),
    ("dream", {"adapter": "auto", "gradient_checkpointing": True}, {}),
    ("masked_lm", {"adapter": "masked_lm", "tokenizer": "builtin:arithmetic"}, {"peft": {"r": 4, "lora_alpha": 8}}),
])
def test_each_kind_trains_evaluates_and_generates_from_the_cli(checkpoints, tmp_path, capsys, kind, model, top):
    start = checkpoints[kind]
    assert main(["run", _write(tmp_path, _recipe(tmp_path, {"path": str(start), **model}, **top))]) == 0
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert set(report["stages"]) == {"base", "sft", "grpo"}
    for stage in ("base", "sft", "grpo"):
        assert report["stages"][stage]["num_problems"] == 4
    assert (run / "sft" / "adapter").is_dir() == ("peft" in top)
    log = json.loads((run / "grpo" / "completions.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "reward", "advantage"} <= set(log)

    # Each final checkpoint loads back as the same kind (auto), mask id included, with trained weights.
    before = load_denoiser(start, kind, tokenizer=load_tokenizer("builtin:arithmetic"))
    for stage in ("sft", "grpo"):
        final = run / stage / "final"
        assert detect_denoiser_kind(final) == kind
        loaded = load_denoiser(final)
        assert type(loaded) is CLASSES[kind] and loaded.mask_token_id == MASK
    changed = [n for n, p in loaded.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert changed, "GRPO final weights equal the starting checkpoint's"

    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(run / "grpo" / "final"), "--adapter", model["adapter"],
                 "--prompt", "What is 7 + 5?", "--gen-length", "8", "--block-length", "8", "--num-generations", "2",
                 "--temperature", "1", "--eos-policy", "none", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert len(row["completion_ids"]) == 8 and MASK not in row["completion_ids"]
        assert min(row["commit_step"]) >= 0  # every position was decoded


def test_recipe_dream_model_scores_token_i_at_position_i(checkpoints):
    """What the trainers read: hidden states, SFT logits and likelihood estimates all score token i at i."""
    model = build_model(ModelConfig(path=str(checkpoints["dream"])))
    assert isinstance(model, DreamAdapter) and not model.shift_logits
    ids = torch.randint(6, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = model.model(input_ids=ids).logits  # the bidirectional Qwen2 model: output i predicts token i+1
        aligned = model.head(model.hidden_states(ids))
        picked = model(ids, logits_mask=ids > 50).logits
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    torch.testing.assert_close(picked, aligned[ids > 50])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 3:] = True
    with torch.no_grad():
        est = elbo(model, ids, response, generator=0, sampler="t", num_samples=1)
        z = ids.masked_fill(est.plan.masked, MASK)
        expected = torch.log_softmax(model(z).logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    counted = est.plan.coef != 0
    assert counted.any()
    torch.testing.assert_close(est.position_logp[counted], expected[counted])


def test_wrapper_checkpoints_save_and_resume_in_the_wrapped_format(checkpoints, tmp_path):
    tokenizer = load_tokenizer("builtin:arithmetic")
    trained = load_denoiser(checkpoints["masked_lm"], tokenizer=tokenizer)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    trained.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any(k.startswith("bert.") for k in saved)  # BERT's own names, not the wrapper's
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["mask_token_id"] == MASK
    # Trainer resumes with load_state_dict(strict=False): the checkpoint's names must land on the weights.
    fresh = load_denoiser(checkpoints["masked_lm"], tokenizer=tokenizer)
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    for name, p in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], p)
    dream = load_denoiser(checkpoints["dream"])
    dream.save_pretrained(tmp_path / "dream")
    raw = json.loads((tmp_path / "dream" / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["architectures"] == ["DreamModel"] and raw["mask_token_id"] == MASK


def test_gradient_checkpointing_reaches_the_wrapped_layers(checkpoints):
    model = build_model(ModelConfig(path=str(checkpoints["dream"]), gradient_checkpointing=True))
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.model.layers)


def test_settings_an_adapter_cannot_honour_are_rejected_before_training(checkpoints, tmp_path, capsys, monkeypatch,
                                                                       add_to_hub_cache):
    dream = {"path": str(checkpoints["dream"])}
    with pytest.raises(ConfigError, match=r"'model\.adapter' is 'dream', but 'model\.init_config'"):
        config_from_dict(_recipe(tmp_path, {"init_config": {"d_model": 32}, "tokenizer": "builtin:arithmetic",
                                            "adapter": "dream"}))
    with pytest.raises(ConfigError, match=r"'model\.adapter' must be one of auto, llada, dream, masked_lm"):
        config_from_dict(_recipe(tmp_path, {**dream, "adapter": "causal"}))
    raw = _recipe(tmp_path, dream)  # auto: the kind is read from config.json
    raw["eval"]["cache"] = "prefix"
    with pytest.raises(ConfigError, match=r"'eval\.cache': block KV caches need KV-context support.*as dream"):
        config_from_dict(raw)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_hub_cache(tmp_path / "hub", "org/dream-tiny", "a" * 40, checkpoints["dream"])
    raw = _recipe(tmp_path, {"path": "org/dream-tiny"})  # a Hub id in the local cache: config.json is read there
    raw["grpo"]["cache"] = "prefix"
    with pytest.raises(ConfigError, match=r"'grpo\.cache'.*org/dream-tiny loaded as dream"):
        config_from_dict(raw)
    raw = _recipe(tmp_path, {"path": "org/not-downloaded", "adapter": "masked_lm"})
    raw["grpo"]["cache"] = "dual"
    with pytest.raises(ConfigError, match=r"'grpo\.cache'.*as masked_lm"):
        config_from_dict(raw)
    raw = _recipe(tmp_path, {**dream, "adapter": "llada"})
    raw["eval"]["cache"] = "prefix"
    assert config_from_dict(raw).model.adapter == "llada"  # LLaDA has KV context

    assert main(["generate", "--model", str(checkpoints["dream"]), "--prompt", "What is 7 + 5?",
                 "--cache", "prefix"]) == 2
    assert "--cache prefix needs KV-context support" in capsys.readouterr().err

    albert = tmp_path / "albert"  # ALBERT implements no gradient checkpointing
    _seeded(lambda: AlbertForMaskedLM(AlbertConfig(vocab_size=143, embedding_size=16, hidden_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64))).save_pretrained(albert)
    cfg = ModelConfig(path=str(albert), tokenizer="builtin:arithmetic", gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"'model\.gradient_checkpointing': AlbertForMaskedLM .* does not support"):
        build_model_and_tokenizer(cfg)
    with pytest.raises(ConfigError, match=r"'model\.mask_token_id' is required"):
        build_model(ModelConfig(path=str(checkpoints["masked_lm"])))  # no mask id in config, no tokenizer files


def test_init_config_weights_follow_the_recipe_seed_and_leave_the_global_rng_alone(tiny_init_config) -> None:
    import torch

    from align.config import ModelConfig

    cfg = ModelConfig(init_config=tiny_init_config(), tokenizer="builtin:arithmetic")
    state = torch.random.get_rng_state()
    a, b = build_model(cfg, seed=0), build_model(cfg, seed=0)
    torch.rand(3)  # whatever the process drew in between
    c, d = build_model(cfg, seed=0), build_model(cfg, seed=1)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                               strict=True):
        assert torch.equal(x, y) and torch.equal(x, z), name
    assert any(not torch.equal(x, w) for x, w in zip(a.state_dict().values(), d.state_dict().values(), strict=True))
    torch.random.set_rng_state(state)
    before = torch.rand(4)
    torch.random.set_rng_state(state)
    build_model(cfg, seed=3)
    assert torch.equal(torch.rand(4), before)  # building a model draws nothing from the global generator
