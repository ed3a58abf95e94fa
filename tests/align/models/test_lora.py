"""LoRA for downstream teams: ``auto`` targets by full module name (never the output head), the trainable
parameter count, PEFT's options passed through the recipe's ``peft`` section, and ``peft.merge: false``."""

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from align.build import apply_lora
from align.config import ConfigError, PeftConfig, config_from_dict
from align.config.schema import build_section
from align.models import (
    DreamAdapter,
    LLaDAModelLM,
    MaskedLMAdapter,
    check_lora_targets,
    llada_8b_config,
    lora_target_modules,
)
from align.pipeline import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

LLADA_LAYERS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
HEAD = "model.transformer.ff_out"
MASK = 3


def _lora_layers(peft_model) -> set[str]:
    """Names (relative to the adapted model) of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _logged_count(caplog) -> tuple[int, int]:
    (line,) = [r.getMessage() for r in caplog.records if r.name == "align.build" and "trainable of" in r.getMessage()]
    match = re.search(r"(\d+) trainable of (\d+) parameters", line)
    return int(match[1]), int(match[2])


# --------------------------------------------------------------------------------------------- auto targets
def test_auto_targets_on_llada_8b_name_every_block_linear_and_never_the_head():
    with torch.device("meta"):
        model = LLaDAModelLM(llada_8b_config())
    cfg = model.config
    names = lora_target_modules(model, full_names=True)
    assert len(names) == len(LLADA_LAYERS) * cfg.n_layers == 224
    assert HEAD not in names and all(n.startswith("model.transformer.blocks.") for n in names)
    assert names[:7] == [f"model.transformer.blocks.0.{leaf}" for leaf in LLADA_LAYERS]
    # Each full name selects exactly one module under PEFT's matching rules, so the head cannot be caught.
    assert set(check_lora_targets(model, names).values()) == {1}
    # The suffix list, by contrast, also selects the head through 'ff_out'.
    assert check_lora_targets(model, lora_target_modules(model))["ff_out"] == cfg.n_layers + 1


@pytest.mark.parametrize("use_dora", [False, True])
def test_trainable_count_on_llada_8b_is_r_times_in_plus_out(caplog, use_dora):
    with torch.device("meta"):
        model = LLaDAModelLM(llada_8b_config())
        cfg = model.config
        with caplog.at_level(logging.INFO, logger="align.build"):
            peft_model = apply_lora(model, PeftConfig(r=16, use_dora=use_dora))
    d, h, n_layers = cfg.d_model, cfg.mlp_hidden_size, cfg.n_layers
    kv = d * cfg.n_kv_heads // cfg.n_heads
    # (in, out) of q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, h), (d, h), (h, d)]
    expected = n_layers * sum(16 * (fan_in + fan_out) for fan_in, fan_out in shapes)
    if use_dora:  # DoRA also trains one magnitude per output feature
        expected += n_layers * sum(fan_out for _, fan_out in shapes)
    assert expected == (43_384_832 if use_dora else 41_943_040)
    logged, total = _logged_count(caplog)
    assert logged == expected == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert total == expected + sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert HEAD not in _lora_layers(peft_model) and len(_lora_layers(peft_model)) == 224


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))


def _tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64))


def test_auto_targets_for_wrapped_denoisers_are_the_bodys_linears():
    dream = DreamAdapter(_tiny_qwen2(), mask_token_id=MASK)
    names = lora_target_modules(dream, full_names=True)
    body = [n for n, m in dream.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert names == body and len(names) == 2 * 7
    assert not [n for n in names if "lm_head" in n]

    bert = MaskedLMAdapter(_tiny_bert(), mask_token_id=MASK)
    names = lora_target_modules(bert, full_names=True)
    # The MLM head holds a linear layer named 'dense' too, as do the body's attention output and MLP: the suffix
    # 'dense' would select it, full names do not.
    assert "model.cls.predictions.transform.dense" in dict(bert.named_modules())
    assert not [n for n in names if ".cls." in n]
    assert len(names) == 2 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    assert check_lora_targets(bert, ["dense"])["dense"] == 2 * 3 + 1
    peft_model = apply_lora(bert, PeftConfig(r=2))
    assert _lora_layers(peft_model) == set(names)


# ---------------------------------------------------------------------------------------- pass-through options
def test_each_peft_option_reaches_the_lora_config_and_the_model(make_tiny_llada):
    cfg = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                     exclude_modules=["model.transformer.blocks.1.q_proj"], modules_to_save=[HEAD], use_rslora=True,
                     use_dora=True, init_lora_weights="gaussian")
    peft_model = apply_lora(make_tiny_llada(), cfg)
    lc = peft_model.peft_config["default"]
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.use_rslora, lc.use_dora, lc.init_lora_weights, lc.bias) == \
        (4, 8, 0.1, True, True, "gaussian", "none")
    assert lc.target_modules == {"q_proj", "v_proj"} and lc.exclude_modules == {"model.transformer.blocks.1.q_proj"}
    assert lc.modules_to_save == [HEAD]
    assert _lora_layers(peft_model) == {"model.transformer.blocks.0.q_proj", "model.transformer.blocks.0.v_proj",
                                        "model.transformer.blocks.1.v_proj"}
    layer = peft_model.get_submodule("base_model.model.model.transformer.blocks.0.q_proj")
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA
    # gaussian init draws A with std 1/r, beyond the bound 1/sqrt(in) of the default (Kaiming-uniform) init
    assert layer.lora_A["default"].weight.abs().max() > 1 / 64 ** 0.5
    head = peft_model.get_submodule(f"base_model.model.{HEAD}")
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())


def test_regex_targets_and_default_init(make_tiny_llada):
    peft_model = apply_lora(make_tiny_llada(), PeftConfig(r=2, target_modules=r".*blocks\.0\.(k_proj|ff_out)"))
    assert peft_model.peft_config["default"].target_modules == r".*blocks\.0\.(k_proj|ff_out)"
    assert _lora_layers(peft_model) == {"model.transformer.blocks.0.k_proj", "model.transformer.blocks.0.ff_out"}
    layer = peft_model.get_submodule("base_model.model.model.transformer.blocks.0.k_proj")
    assert not layer.lora_B["default"].weight.any()  # init_lora_weights: true -> the adapter starts as a no-op
    bert = apply_lora(MaskedLMAdapter(_tiny_bert(), mask_token_id=MASK), PeftConfig(r=2, bias="all"))
    assert bert.peft_config["default"].bias == "all"
    assert bert.get_submodule("base_model.model.model.bert.embeddings.LayerNorm").bias.requires_grad


def test_same_seed_gives_the_same_adapter(make_tiny_llada):
    def lora_a(seed):
        peft_model = apply_lora(make_tiny_llada(), PeftConfig(r=2), seed=seed)
        return peft_model.get_submodule("base_model.model.model.transformer.blocks.0.q_proj").lora_A["default"].weight

    state = torch.random.get_rng_state()
    assert torch.equal(lora_a(7), lora_a(7)) and not torch.equal(lora_a(7), lora_a(8))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was


def test_user_names_that_match_nothing_are_errors(make_tiny_llada, caplog):
    model = make_tiny_llada()
    for key, value in [("target_modules", ["q_proj", "o_proj"]), ("exclude_modules", ["down_proj"]),
                       ("modules_to_save", ["lm_head"]), ("target_modules", r".*\.gate_proj")]:
        with pytest.raises(ConfigError, match=rf"peft\.{key} .* match no module of LLaDAModelLM"):
            apply_lora(model, PeftConfig(**{key: value}))
    with pytest.raises(ConfigError, match=r"'peft\.bias' is 'all' but LLaDAModelLM has no bias"):
        apply_lora(make_tiny_llada(), PeftConfig(bias="all"))
    with caplog.at_level(logging.WARNING, logger="align.build"):
        peft_model = apply_lora(make_tiny_llada(), PeftConfig(target_modules=["ff_out"]))
    assert HEAD in _lora_layers(peft_model)
    assert any("also match the output head model.transformer.ff_out" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align.build"):
        peft_model = apply_lora(make_tiny_llada(), PeftConfig(target_modules=["ff_out"], exclude_modules=[HEAD]))
    assert HEAD not in _lora_layers(peft_model) and not caplog.records


@pytest.mark.parametrize("section,message", [
    ({"bias": "some"}, r"'peft\.bias' must be one of none, all, lora_only, got 'some'"),
    ({"init_lora_weights": "pissa_niter_4"}, r"'peft\.init_lora_weights' 'pissa_niter_4' is not supported: it "
                                             r"rewrites the base weights"),
    ({"init_lora_weights": "eva"}, r"'peft\.init_lora_weights' 'eva' is not supported: it needs a data-driven"),
    ({"init_lora_weights": "uniform"}, r"'peft\.init_lora_weights' must be one of true, false, gaussian, orthogonal"),
    ({"init_lora_weights": "orthogonal", "r": 3}, r"'peft\.init_lora_weights' 'orthogonal' needs an even 'peft\.r'"),
    ({"target_modules": "(q_proj"}, r"'peft\.target_modules' is not a valid regular expression"),
    ({"target_modules": []}, r"'peft\.target_modules' is an empty list"),
    ({"target_modules": "all-linear"}, r"'peft\.target_modules' 'all-linear' is not accepted: use 'auto'"),
    ({"exclude_modules": ["q_proj", " "]}, r"'peft\.exclude_modules' has an empty name at position 1"),
    ({"modules_to_save": "ff_out"}, r"'peft\.modules_to_save' must be list\[str\] \| None"),
    ({"use_dora": "yes"}, r"'peft\.use_dora' must be bool"),
    ({"merge": 0}, r"'peft\.merge' must be bool"),
    ({"lora_alpha": 0}, r"'peft\.lora_alpha' must be > 0"),
    ({"use_dorra": True}, r"unknown key 'peft\.use_dorra' \(did you mean 'use_dora'\?\)"),
])
def test_peft_section_is_checked_at_load_time(section, message):
    with pytest.raises(ConfigError, match=message):
        build_section(PeftConfig, section, "peft")


def test_peft_section_defaults_and_accepted_values():
    cfg = build_section(PeftConfig, {"init_lora_weights": False, "exclude_modules": r".*ff_out", "merge": False,
                                     "bias": "lora_only", "target_modules": ["q_proj"]}, "peft")
    assert (cfg.init_lora_weights, cfg.exclude_modules, cfg.merge, cfg.bias) == (False, r".*ff_out", False, "lora_only")
    assert PeftConfig().merge is True and PeftConfig().target_modules == "auto"


# ------------------------------------------------------------------------------------------------ merge: false
def test_merge_false_keeps_only_the_adapter_across_stages(tmp_path, make_tiny_llada):
    """SFT then GRPO with ``peft.merge: false``: no merged weights are written, both stages train one adapter over
    the untouched base, evaluation runs on the adapted model, and a re-run loads the finished stages' adapters."""
    from align.data.tokenizer import save_tokenizer
    from align.models.resolve import load_tokenizer

    tok = load_tokenizer("builtin:arithmetic")
    base_dir = tmp_path / "base"
    make_tiny_llada(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64,
                    mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id).save_pretrained(base_dir)
    save_tokenizer(tok, base_dir)
    small = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "learning_rate": 1e-2}
    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["sft", "grpo"],
           "model": {"path": str(base_dir)},
           "data": {"task": "arithmetic", "task_args": {"num_train": 16, "num_test": 4, "seed": 0}, "max_length": 96},
           "peft": {"r": 2, "lora_alpha": 4, "merge": False},
           "sft": small,
           "grpo": {**small, "per_device_train_batch_size": 4, "num_generations": 4, "gen_length": 8,
                    "denoising_steps": 8, "block_length": 8, "temperature": 1.0,
                    "rewards": [{"name": "regex_format", "pattern": r"\d", "mode": "search"}]},
           "eval": {"num_problems": 4, "batch_size": 4, "gen_length": 8, "denoising_steps": 8, "block_length": 8}}
    report = run_recipe(config_from_dict(raw))
    run = tmp_path / "run"
    adapters = {}
    for stage in ("sft", "grpo"):
        final = run / stage / "final"
        assert not (final / "config.json").exists() and not list(final.glob("model*.safetensors"))
        assert (final / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
        adapters[stage] = load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))
        assert adapters[stage] and all(".lora_" in k for k in adapters[stage])
        assert load_file(str(final / "adapter_model.safetensors")).keys() == adapters[stage].keys()
        config = json.loads((final / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base_dir.resolve())  # both stages adapt the base
        assert report["stages"][stage]["checkpoint"] == str(final) and "accuracy" in report["stages"][stage]
        assert report["recipe"]["peft"]["merge"] is False
    assert any(not torch.equal(adapters["sft"][k], adapters["grpo"][k]) for k in adapters["sft"])  # GRPO trained on

    # A re-run finds both stages finished: their adapters are loaded, nothing is trained again.
    mtime = (run / "grpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_recipe(config_from_dict(raw))
    assert (run / "grpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert again["stages"]["grpo"]["accuracy"] == report["stages"]["grpo"]["accuracy"]
