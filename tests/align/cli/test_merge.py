"""``dlm-align merge``: a saved adapter merged into its base gives the same model as merging in process; the base
comes from adapter_config.json (a directory or a Hub id from the offline cache) or --base; errors say what is wrong."""

import json
from pathlib import Path

import pytest
import torch

from align.build import apply_lora
from align.cli import main
from align.config import PeftConfig
from align.data.tokenizer import build_word_tokenizer, save_tokenizer
from align.models import LLaDAModelLM, MaskedLMAdapter, load_denoiser, load_model, load_tokenizer, tiny_llada_config

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["What is two plus three ?", "The answer is five ."]
HUB_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE")


def save_base(path: Path, *, d_model: int = 32, seed: int = 0) -> LLaDAModelLM:
    """A tiny native LLaDA checkpoint with a word-level tokenizer in ``path``; returns the model."""
    tok = build_word_tokenizer(CORPUS)
    cfg = tiny_llada_config(vocab_size=len(tok), d_model=d_model, n_layers=2, n_heads=2, mlp_hidden_size=64,
                            mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LLaDAModelLM(cfg).eval()
    model.save_pretrained(path)
    save_tokenizer(tok, path)
    return model


def save_adapter(model: torch.nn.Module, path: Path, *, base: str | None, with_tokenizer: bool = True, **peft):
    """Wrap ``model`` with a LoRA adapter whose weights are all non-zero, save it; return the PEFT model."""
    cfg = PeftConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **peft})
    peft_model = apply_lora(model, cfg, base_model=base, seed=1)
    peft_model.save_pretrained(path)
    if with_tokenizer:
        save_tokenizer(build_word_tokenizer(CORPUS), path)
    return peft_model


IDS = torch.tensor([[1, 7, 8, 9, 5, 5, 10]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    save_base(tmp_path / "base")
    return tmp_path / "base"


HEAD = "model.transformer.ff_out"


@pytest.mark.parametrize("options,summary", [
    ({}, "(LoRA r=4, 14 layers)"),
    ({"use_dora": True, "use_rslora": True, "modules_to_save": [HEAD]},
     f"(LoRA r=4, 14 layers and 1 whole module(s) ({HEAD}))"),
])
def test_merge_equals_merging_in_process(tmp_path, base_dir, capsys, options, summary):
    model = load_model(base_dir)
    if options:  # train the saved copy of the head too: shift its weights so that the copy matters
        peft_model = apply_lora(model, PeftConfig(r=4, lora_alpha=8, init_lora_weights=False, **options), seed=1,
                                base_model=str(base_dir))
        with torch.no_grad():
            peft_model.get_submodule(f"base_model.model.{HEAD}").modules_to_save["default"].weight.add_(0.5)
        peft_model.save_pretrained(tmp_path / "adapter")
        save_tokenizer(build_word_tokenizer(CORPUS), tmp_path / "adapter")
    else:
        peft_model = save_adapter(model, tmp_path / "adapter", base=str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    in_process = peft_model.merge_and_unload().eval()

    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert f"merged {tmp_path / 'adapter'} {summary} into {base_dir}" in out
    assert f"wrote {tmp_path / 'merged'}: float32 weights, tokenizer from {tmp_path / 'adapter'}" in out
    merged = load_model(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(in_process), rtol=0, atol=0)
    assert not torch.allclose(logits(merged), logits(load_model(base_dir)))  # the adapter did change the model
    assert load_tokenizer(tmp_path / "merged").get_vocab() == load_tokenizer(base_dir).get_vocab()
    assert not list((tmp_path / "merged").glob("adapter*"))


def test_base_from_a_hub_id_or_from_base(tmp_path, base_dir, monkeypatch, add_to_hub_cache, capsys):
    cache = tmp_path / "hf" / "hub"
    add_to_hub_cache(cache, "tiny-org/tiny-llada", "0123456789abcdef0123456789abcdef01234567", base_dir)
    for name in HUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft_model = save_adapter(load_model(base_dir), tmp_path / "adapter", base="tiny-org/tiny-llada@main",
                              with_tokenizer=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("tiny-org/tiny-llada", "main")
    expected = logits(peft_model.merge_and_unload().eval())

    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "from-hub")]) == 0
    out = capsys.readouterr().out
    assert "into tiny-org/tiny-llada@main (" in out and "tokenizer from " + str(cache) in out
    torch.testing.assert_close(logits(load_model(tmp_path / "from-hub")), expected, rtol=0, atol=0)

    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "from-dir"), "--base", str(base_dir),
                 "--dtype", "bfloat16"]) == 0
    assert f"into {base_dir}\n" in capsys.readouterr().out
    merged = load_model(tmp_path / "from-dir")
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged.float()), expected, rtol=0.05, atol=0.05)


def test_merge_into_a_wrapped_masked_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64))
    bert.config.mask_token_id = 3
    bert.save_pretrained(tmp_path / "bert")
    peft_model = save_adapter(load_denoiser(tmp_path / "bert"), tmp_path / "adapter", base=str(tmp_path / "bert"),
                              with_tokenizer=False)
    expected = logits(peft_model.merge_and_unload().eval())
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_denoiser(tmp_path / "merged").eval()
    assert isinstance(merged, MaskedLMAdapter)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=0)


def test_errors_say_what_is_wrong(tmp_path, base_dir, capsys):
    def fails(args: list[str], message: str) -> None:
        assert main(["merge", *args]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    fails([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope: adapter directory does not exist; a LoRA "
                                                                     "stage writes one to <output_dir>/<stage>/adapter")
    fails([str(base_dir), "--out", str(tmp_path / "o")],
          "no adapter_config.json, so not a PEFT adapter directory (it holds a full checkpoint, config.json: "
          "nothing to merge)")
    save_adapter(load_model(base_dir), tmp_path / "orphan", base=None)
    config = json.loads((tmp_path / "orphan" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "orphan" / "adapter_config.json").write_text(json.dumps(config))
    fails([str(tmp_path / "orphan"), "--out", str(tmp_path / "o")], "names no base model (base_model_name_or_path "
                                                                       "is empty); pass --base SPEC")
    fails([str(tmp_path / "orphan"), "--out", str(tmp_path / "o"), "--base", str(tmp_path / "gone")],
          f"base model of adapter {tmp_path / 'orphan'}: {tmp_path / 'gone'}: checkpoint directory does not exist")
    save_base(tmp_path / "wider", d_model=48)
    fails([str(tmp_path / "orphan"), "--out", str(tmp_path / "o"), "--base", str(tmp_path / "wider")],
          f"adapter {tmp_path / 'orphan'} does not match the base model {tmp_path / 'wider'}: "
          "model.transformer.blocks.0.q_proj maps 48 -> 48 features in the base, 32 -> 32 in the adapter; "
          "model.transformer.blocks.0.k_proj maps 48 -> 48")
    fails([str(tmp_path / "orphan"), "--out", str(tmp_path / "orphan"), "--base", str(base_dir)],
          "is the directory of the adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep")
    fails([str(tmp_path / "orphan"), "--out", str(tmp_path / "taken"), "--base", str(base_dir)],
          "taken: exists and is not empty (use --force to replace it)")
    assert main(["merge", str(tmp_path / "orphan"), "--out", str(tmp_path / "taken"), "--base", str(base_dir),
                 "--force"]) == 0
    assert (tmp_path / "taken" / "config.json").is_file() and not (tmp_path / "taken" / "notes.txt").exists()
