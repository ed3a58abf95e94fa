"""Clear messages: an out-of-memory error in `dlm-align run` names the phase and the settings to lower, and
impossible settings fail when the recipe is loaded, naming the key, instead of during training."""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main
from align.config import ConfigError, config_from_dict


def _raw(tmp_path: Path, tiny_init_config, **top) -> dict:
    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["sft"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 16, "num_test": 4, "seed": 0}, "max_length": 128},
           "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
           "eval": {"enabled": False, "num_problems": 4, "batch_size": 4, "gen_length": 8, "block_length": 8,
                    "denoising_steps": 8}}
    raw.update(top)
    return raw


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_in_training_names_the_settings_to_lower(tmp_path, tiny_init_config, monkeypatch, capsys,
                                                                error):
    from align.trainers.sft import DiffusionSFTTrainer

    def oom(self, *a, **k):
        raise error("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DiffusionSFTTrainer, "train", oom)
    path = _write(tmp_path, _raw(tmp_path, tiny_init_config))
    assert main(["run", path]) == 1
    err = capsys.readouterr().err
    kind = "GPU" if error is torch.OutOfMemoryError else "host"
    assert err.startswith(f"error: out of {kind} memory training stage 'sft': CUDA out of memory.")
    assert ("'sft.per_device_train_batch_size' (4 sequences): lower it to 2 and raise "
            "'sft.gradient_accumulation_steps' from 2 to 4 to keep the batch per optimizer step") in err
    for hint in ("'data.max_length' (128 tokens)", "'model.gradient_checkpointing: true'",
                 "'model.dtype: bfloat16' (now float32)", "'peft'", f"`dlm-align validate {path}`"):
        assert hint in err, hint
    assert "Traceback" not in err


def test_out_of_memory_in_grpo_keeps_the_batch_a_multiple_of_the_group(tmp_path, tiny_init_config, monkeypatch,
                                                                        capsys):
    from align.trainers.grpo import DiffusionGRPOTrainer

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DiffusionGRPOTrainer, "train", oom)
    raw = _raw(tmp_path, tiny_init_config, stages=["grpo"])
    raw["grpo"] = {"max_steps": 2, "per_device_train_batch_size": 12, "num_generations": 4, "gen_length": 8,
                   "denoising_steps": 8, "block_length": 8, "rewards": [{"name": "task_accuracy"}]}
    del raw["sft"]
    assert main(["run", _write(tmp_path, raw)]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory training stage 'grpo'" in err
    assert "'grpo.per_device_train_batch_size' (12 completions): lower it to 4 and raise " \
           "'grpo.gradient_accumulation_steps' from 1 to 3" in err
    assert "'grpo.num_generations' (4;" in err and "'grpo.gen_length' (8)" in err


def test_out_of_memory_in_evaluation_names_the_eval_settings(tmp_path, tiny_init_config, monkeypatch, capsys):
    import align.pipeline.recipe as recipe

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(recipe, "evaluate_sharded", oom)
    raw = _raw(tmp_path, tiny_init_config)
    raw["eval"]["enabled"] = True
    assert main(["run", _write(tmp_path, raw)]) == 1
    err = capsys.readouterr().err
    assert "out of GPU memory evaluating stage 'base'" in err
    assert "'eval.batch_size' (4 prompts per sampler call)" in err and "'eval.gen_length' (8)" in err
    assert "per_device_train_batch_size" not in err


def test_other_errors_are_not_reported_as_out_of_memory(tmp_path, tiny_init_config, monkeypatch):
    from align.trainers.sft import DiffusionSFTTrainer

    def fail(self, *a, **k):
        raise RuntimeError("something else")

    monkeypatch.setattr(DiffusionSFTTrainer, "train", fail)
    with pytest.raises(RuntimeError, match="something else"):
        main(["run", _write(tmp_path, _raw(tmp_path, tiny_init_config))])


# ------------------------------------------------------------------------------------------ load-time checks
@pytest.mark.parametrize("change,message", [
    ({"sft": {"per_device_train_batch_size": 0}}, "'sft.per_device_train_batch_size' must be >= 1, got 0"),
    ({"sft": {"gradient_accumulation_steps": 0}}, "'sft.gradient_accumulation_steps' must be >= 1, got 0"),
    ({"sft": {"per_device_eval_batch_size": 0}}, "'sft.per_device_eval_batch_size' must be >= 1, got 0"),
    ({"sft": {"learning_rate": -1e-4}}, "'sft.learning_rate' must be >= 0, got -0.0001"),
    ({"sft": {"max_steps": -1, "num_train_epochs": 0}},
     "'sft' would train no step: set 'sft.max_steps' > 0 or 'sft.num_train_epochs' > 0 (got max_steps -1, "
     "num_train_epochs 0)"),
    ({"sft": {"max_nonfinite_steps": 0}}, "'sft.max_nonfinite_steps' must be an integer >= 1"),
    ({"stages": ["grpo"], "grpo": {"per_device_train_batch_size": 0}},
     "'grpo.per_device_train_batch_size' must be >= 1, got 0"),
    ({"stages": ["grpo"], "grpo": {"max_nonfinite_steps": -1}}, "'grpo.max_nonfinite_steps' must be an integer >= 1"),
    ({"stages": ["vrpo"], "vrpo": {"max_nonfinite_steps": 0}}, "'vrpo.max_nonfinite_steps' must be an integer >= 1"),
    ({"data": {"task": "arithmetic", "task_args": {"num_train": 0}}},
     "'data.task_args.num_train' must be >= 1: stages ['sft'] need training rows, got 0"),
    ({"data": {"task": "arithmetic", "task_args": {"num_test": 0}}, "eval": {"enabled": True}},
     "'data.task_args.num_test' is 0, but evaluation (or 'vrpo.eval_pairs') needs held-out rows"),
])
def test_impossible_settings_fail_at_load_time(tmp_path, tiny_init_config, change, message):
    raw = _raw(tmp_path, tiny_init_config)
    if "stages" in change:
        del raw["sft"]
    for key, value in copy.deepcopy(change).items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw, source="r.yaml")
    assert message in str(exc.value)


def test_possible_edge_settings_still_load(tmp_path, tiny_init_config):
    raw = _raw(tmp_path, tiny_init_config)
    raw["sft"].update({"learning_rate": 0.0, "max_steps": 1, "num_train_epochs": 0, "max_nonfinite_steps": 1})
    raw["data"]["task_args"]["num_test"] = 0                   # no evaluation: no held-out rows needed
    assert config_from_dict(raw).stage_options("sft")[0].max_nonfinite_steps == 1


def test_impossible_setting_stops_the_cli_before_any_model_is_built(tmp_path, tiny_init_config, capsys):
    path = _write(tmp_path, _raw(tmp_path, tiny_init_config))
    assert main(["run", path, "sft.gradient_accumulation_steps=0"]) == 2
    assert "'sft.gradient_accumulation_steps' must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
