"""Input paths of a recipe: the lookup rule for relative paths, what is recorded, and the checks that name every
missing input without downloading anything."""

import json
from pathlib import Path

import pytest
import yaml

from align.config import config_from_dict, config_to_dict, load_config
from align.config.paths import check_paths, missing_paths_error, path_candidates
from align.recipes import recipe_path

SHIPPED_ZERO3 = recipe_path("quickstart").parent / "accelerate" / "zero3.json"


def _recipe(tmp_path: Path, **sections) -> Path:
    """A recipe file in ``tmp_path/recipes/`` training on local files with a built-in tokenizer."""
    raw = {"output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "model": {"init_config": {"d_model": 32, "n_heads": 2, "n_layers": 1, "mlp_hidden_size": 64},
                     "tokenizer": "builtin:arithmetic"},
           "data": {"task": None, "train_files": ["data/train.jsonl"], "use_chat_template": False},
           "eval": {"enabled": False}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipes" / "mine.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def _rows(path: Path, n: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": "What is 1 + 2 ?", "completion": "3"}) + "\n" for _ in range(n)))
    return path


def test_recipe_paths_are_looked_up_next_to_the_file_then_shipped_then_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    beside = _rows(tmp_path / "recipes" / "data" / "train.jsonl")
    _rows(cwd / "data" / "train.jsonl")                       # also in the cwd: the recipe's directory wins
    recipe = _recipe(tmp_path, sft={"deepspeed": "recipes/accelerate/zero3.json"})
    cfg = load_config(recipe)
    assert cfg.data.train_files == [str(beside)]
    assert cfg.sft["deepspeed"] == str(SHIPPED_ZERO3)         # a shipped file, by its name in the repository
    cfg = load_config(recipe, ["sft.deepspeed=accelerate/zero3.json"])
    assert cfg.sft["deepspeed"] == str(SHIPPED_ZERO3)
    _rows(cwd / "only-here.jsonl")
    cfg = load_config(recipe, ["data.train_files=[only-here.jsonl]"])
    assert cfg.data.train_files == [str(cwd / "only-here.jsonl")]


def test_command_line_paths_are_looked_up_in_the_cwd_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "recipes" / "data" / "train.jsonl")
    in_cwd = _rows(tmp_path / "data" / "train.jsonl")
    recipe = _recipe(tmp_path)
    cfg = load_config(recipe, ["data.train_files=[data/train.jsonl]"])
    assert cfg.data.train_files == [str(in_cwd)]
    assert path_candidates("data/train.jsonl", recipe.parent, cwd_first=True)[0] == in_cwd
    assert path_candidates("data/train.jsonl", recipe.parent)[0] == recipe.parent / "data" / "train.jsonl"


def test_every_missing_input_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, model={"init_config": None, "path": "no/such/dir", "tokenizer": None},
                     data={"eval_files": ["held-out.jsonl"]}, sft={"deepspeed": "ds.json"})
    cfg = load_config(recipe)
    # a missing relative path is recorded where the rule looks first: next to the recipe
    assert cfg.data.train_files == [str(recipe.parent / "data" / "train.jsonl")]
    checks = {c.key: c for c in check_paths(cfg)}
    assert {k for k, c in checks.items() if c.problem} == {"model.path", "data.train_files[0]", "data.eval_files[0]",
                                                          "sft.deepspeed"}
    assert "does not exist" in checks["data.eval_files[0]"].message
    err = missing_paths_error(list(checks.values()))
    assert err is not None and str(err).startswith("4 input path(s)")
    assert str(recipe.parent / "ds.json") in str(err)


def test_a_config_file_that_does_not_parse_is_a_problem(tmp_path):
    _rows(tmp_path / "recipes" / "data" / "train.jsonl")
    (tmp_path / "recipes" / "ds.json").write_text("{not json")
    checks = check_paths(load_config(_recipe(tmp_path, sft={"deepspeed": "ds.json"})))
    bad = [c for c in checks if c.problem]
    assert [c.key for c in bad] == ["sft.deepspeed"] and "not valid JSON" in bad[0].message


def test_hub_ids_are_looked_up_in_the_cache_only(tmp_path, monkeypatch, add_to_hub_cache):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read once at import (CI sets it)
    raw = yaml.safe_load(recipe_path("llada/sft-lora").read_text())
    raw["data"]["train_files"] = [str(_rows(tmp_path / "train.jsonl"))]
    cfg = config_from_dict(raw)
    assert cfg.model.path == "GSAI-ML/LLaDA-8B-Base"                    # Hub ids stay as written
    (check,) = [c for c in check_paths(cfg) if c.key == "model.path"]
    assert check.status == "download" and not check.problem and str(cache) in check.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (check,) = [c for c in check_paths(cfg) if c.key == "model.path"]
    assert check.problem and "offline" in check.message
    # once in the cache (config and tokenizer files), it resolves to the snapshot
    snapshot = add_to_hub_cache(cache, "GSAI-ML/LLaDA-8B-Base", "a" * 40,
                                recipe_path("quickstart").parents[1] / "data" / "checkpoints" / "quickstart-base")
    (check,) = [c for c in check_paths(cfg) if c.key == "model.path"]
    assert check.status == "ok" and check.directory == snapshot


def test_recipe_yaml_records_the_resolved_paths(tmp_path, monkeypatch):
    import align.pipeline.recipe as recipe_module
    from align.pipeline import run_recipe

    monkeypatch.chdir(tmp_path)
    train = _rows(tmp_path / "recipes" / "data" / "train.jsonl")

    def no_model(*args, **kwargs):
        raise RuntimeError("model building reached")

    monkeypatch.setattr(recipe_module, "build_model_and_tokenizer", no_model)
    with pytest.raises(RuntimeError, match="model building reached"):
        run_recipe(load_config(_recipe(tmp_path)))
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recorded["data"]["train_files"] == [str(train)]
    assert config_to_dict(load_config(_recipe(tmp_path)))["data"]["train_files"] == [str(train)]
