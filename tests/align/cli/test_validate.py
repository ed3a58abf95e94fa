"""``dlm-align validate`` and the start of ``run``: paths and rows are checked before any model is loaded, every
problem is named, and validate prints the plan, the launch commands and a memory table."""

import json
from pathlib import Path

import pytest
import yaml

from align.cli import main


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and the Hub reachable in principle (validate never contacts it)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once at import (CI sets it)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, train: Path, stages=("sft",), **extra) -> Path:
    raw = {"output_dir": str(tmp_path / "run"), "stages": list(stages),
           "model": {"init_config": {"d_model": 32, "n_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
                                     "max_sequence_length": 128, "mask_token_id": 5, "eos_token_id": 0,
                                     "pad_token_id": 0},
                     "tokenizer": "builtin:arithmetic"},
           "data": {"task": None, "train_files": [str(train)], "use_chat_template": True, "max_length": 64},
           "eval": {"enabled": False}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


GOOD = {"prompt": "What is 3 + 4 ?", "completion": "3 + 4 = 7", "answer": "7"}


def test_validate_8b_recipe_prints_memory_table_and_launch_command(capsys, empty_hub_cache):
    rc = main(["validate", "llada/sft-lora", "data.train_files=[/path/to/sft.jsonl]", "--nproc", "8"])
    out = capsys.readouterr().out
    assert rc == 2 and "NOT ok" in out
    assert "torchrun --nproc_per_node 8 -m align.cli run llada/sft-lora 'data.train_files=[/path/to/sft.jsonl]'" \
        in out
    assert "accelerate launch --num_processes 8 -m align.cli run llada/sft-lora" in out
    assert "dlm-align run llada/sft-lora 'data.train_files=[/path/to/sft.jsonl]' --nproc 8" in out
    assert "4 sequences per device x 8 accumulation x 8 process(es) = 256 sequences per optimizer step" in out
    assert "known shape of GSAI-ML/LLaDA-8B-Base" in out
    for row in ("weights", "gradients", "optimizer states", "activations (checkpointing on)",
                "activations (checkpointing off)", "output head", "total"):
        assert f"\n  {row} " in out, row
    assert "download  model.path" in out
    assert "1 problem(s):\n  data.train_files[0]: /path/to/sft.jsonl: file does not exist" in out


def test_validate_names_every_missing_path(tmp_path, capsys, empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["validate", "illada/sft", "data.train_files=[/path/to/a.jsonl,/path/to/b.jsonl]",
               f"sft.accelerator_config={tmp_path}/none.json"])
    out = capsys.readouterr().out
    assert rc == 2
    problems = out.split("problem(s):")[1]
    for key in ("model.path", "data.train_files[0]", "data.train_files[1]", "sft.accelerator_config"):
        assert f"\n  {key}: " in problems, key
    table = out.split("problem(s):")[0]                                      # the table is still printed
    assert "known shape of GSAI-ML/iLLaDA-8B-Base" in table and "\n  total " in table
    assert "DeepSpeed ZeRO-3" in out and "gathered module (ZeRO-3)" in out


def test_validate_reports_a_bad_row_with_its_file_and_row(tmp_path, capsys):
    train = _write_rows(tmp_path / "train.jsonl", [GOOD, GOOD, {"prompt": "What is 1 + 1 ?"}, GOOD])
    rc = main(["validate", str(_recipe(tmp_path, train))])
    out = capsys.readouterr().out
    assert rc == 2
    assert f"{train}:3: missing field 'completion'" in out


def test_a_bad_row_is_named_within_its_own_file(tmp_path, capsys):
    first = _write_rows(tmp_path / "a.jsonl", [GOOD] * 3)
    second = _write_rows(tmp_path / "b.jsonl", [GOOD, {"prompt": "What is 2 + 2 ?", "completion": 4}])
    recipe = _recipe(tmp_path, first)
    assert main(["validate", str(recipe), f"data.train_files=[{first},{second}]"]) == 2
    assert f"{second}:2: field 'completion' must be a string" in capsys.readouterr().out


def test_validate_ok_prints_row_stats_plan_and_memory(tmp_path, capsys):
    train = _write_rows(tmp_path / "train.jsonl", [GOOD] * 6)
    recipe = _recipe(tmp_path, train, stages=("sft", "grpo"), grpo={"num_generations": 2,
                                                                   "per_device_train_batch_size": 4,
                                                                   "gen_length": 8, "block_length": 8,
                                                                   "denoising_steps": 8})
    rc = main(["validate", str(recipe), "--nproc", "4", "--nnodes", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.rstrip().endswith(f"{recipe}: ok (stages: sft, grpo; output_dir: {tmp_path / 'run'})")
    assert "sft: 6 of 6 rows kept" in out and "grpo: 6 of 6 rows kept" in out
    assert "plan: 8 process(es) = 4 per node (given) x 2 node(s)" in out
    assert "4 completions per device = 2 prompt(s) x 2 generations; x 1 accumulation x 8 process(es) = 16 prompts" \
        in out
    assert "torchrun --nnodes 2 --nproc_per_node 4 --node_rank <0..1>" in out
    assert "model shape from model.init_config: d_model 32, 2 layers" in out
    assert "memory per GPU, stage grpo" in out and "rollout sampling" in out


def test_run_checks_rows_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import align.build
    import align.pipeline.recipe as recipe_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", no_model)
    monkeypatch.setattr(align.build, "build_model", no_model)
    train = _write_rows(tmp_path / "train.jsonl", [GOOD, {"prompt": 3, "completion": "x"}])
    assert main(["run", str(_recipe(tmp_path, train))]) == 2
    assert f"{train}:2: field 'prompt' must be a string or messages" in capsys.readouterr().err
    # GRPO rows go through the prompt checks
    train = _write_rows(tmp_path / "prompts.jsonl", [GOOD, GOOD, {"question": "no prompt"}])
    assert main(["run", str(_recipe(tmp_path, train, stages=("grpo",))), "grpo.per_device_train_batch_size=8"]) == 2
    assert f"{train}:3: has neither a 'prompt' nor a 'messages' column" in capsys.readouterr().err


def test_run_names_every_missing_path_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import align.pipeline.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    recipe = _recipe(tmp_path, tmp_path / "missing.jsonl", data={"task": None, "train_files": ["a.jsonl"],
                                                                 "eval_files": ["b.jsonl"]}, eval={"enabled": True})
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "2 input path(s) of the recipe are missing" in err
    assert f"data.train_files[0]: {tmp_path / 'a.jsonl'}: file does not exist" in err
    assert f"data.eval_files[0]: {tmp_path / 'b.jsonl'}: file does not exist" in err
    assert not (tmp_path / "run").exists()
