"""Recipe loading: every shipped recipe validates; bad keys and impossible settings are named."""

import pytest
import yaml

from align.config import ConfigError, apply_overrides, config_from_dict, load_config
from align.recipes import list_recipes, recipe_path


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    path = recipe_path(name)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# dlm-align run "), f"{name}: first line must be the command that runs it"
    cfg = load_config(path)
    assert cfg.stages


def _base():
    return yaml.safe_load(recipe_path("quickstart").read_text())


@pytest.mark.parametrize("override,needle", [
    ("sft.learnin_rate=1e-3", "'sft.learnin_rate' (did you mean 'learning_rate'?)"),
    ("model.pth=x", "'model.pth' (did you mean 'path'?)"),
    ("bogus=1", "unknown key 'bogus'"),
    ("eval.block_length=5", "'eval.gen_length' (32) must be a positive multiple of 'eval.block_length' (5)"),
    ("eval.steps=0", "'eval.steps' was renamed: use 'eval.denoising_steps'"),
    ("grpo.max_completion_length=16", "'grpo.max_completion_length' was renamed: use 'grpo.gen_length'"),
    ("eval.denoising_steps=0", "'eval.denoising_steps' (0) must be a positive multiple of the number of blocks "
                               "(1 = 'eval.gen_length' / 'eval.block_length')"),
    ("grpo.epsilon=0", "'grpo.epsilon' must be > 0, got 0"),
    ("grpo.estimator=two_step", "'grpo.estimator' must be one of one_step, coupled, elbo, trace"),
    ("grpo.rewards=[{name: task_acuracy}]", "unknown reward 'task_acuracy'"),
    ("grpo.rewards=[{name: loop_penalty, p_maxx: 3}]", "unknown argument(s) ['p_maxx']"),
    ("grpo.reward_failure={on_error: ignore}", "'grpo.reward_failure' is invalid: on_error must be one of"),
    ("grpo.per_device_train_batch_size=12", "'grpo.per_device_train_batch_size' (12) counts completions"),
    ("eval.loop_guard={penalty: -1}", "'eval.loop_guard.penalty' must be a number >= 0"),
    ("eval.loop_detection={p_maxx: 3}", "'eval.loop_detection.p_maxx' is not a loop-detection setting"),
    ("eval.loop_detection={source: tokens}", "'eval.loop_detection' source must be 'auto', 'ids', 'text' or 'both'"),
    ("eval.loop_detection={word_min_span: 0}", "'eval.loop_detection' word_min_span must be an int >= 1"),
    ("eval.loop_detection={scale: 2}", "'eval.loop_detection.scale' is not a loop-detection setting"),
    ("sft.normalization=mean", "'sft.normalization'"),
    ("sft.eos_train=-2", "'sft.eos_train'"),
    ("sft.t_min=1.0", "t_min"),
    ("stages=[sft,grpo_x]", "'stages' must be one of pretrain, sft, grpo, vrpo, got 'grpo_x'"),
    ("eval.cache=full", "'eval.cache'"),
    ("model.dtype=float8", "'model.dtype'"),
    ("sft.output_dir=x", "'sft.output_dir' is set by dlm-align"),
    ("sft.lr_scheduler_type=nope", "'sft': invalid training arguments"),
    ("data.task_args.num_trian=5", "'data.task_args.num_trian'"),
    ("eval.num_problems=abc", "'eval.num_problems' must be int"),
    ("model.init_config={d_model: 8}", "'model.path' or 'model.init_config': set exactly one"),
    ("pretrain.max_steps=3", "section 'pretrain' is set but 'pretrain' is not in 'stages'"),
])
def test_bad_recipes_name_the_key(override, needle):
    raw = apply_overrides(_base(), [override])
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw, source="quickstart.yaml")
    assert needle in str(exc.value)
    assert str(exc.value).startswith("quickstart.yaml: ")


def test_overrides_apply_yaml_values():
    raw = apply_overrides(_base(), ["sft.learning_rate=5e-4", "eval.threshold=0.9", "peft.r=4", "eval.cache=prefix"])
    cfg = config_from_dict(raw)
    assert cfg.sft["learning_rate"] == 5e-4 and cfg.eval.threshold == 0.9 and cfg.peft.r == 4
    assert cfg.eval.cache == "prefix"
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["novalue"])


def test_peft_with_pretrain_rejected():
    raw = yaml.safe_load(recipe_path("quickstart-pretrain").read_text())
    raw["peft"] = {"r": 4}
    with pytest.raises(ConfigError, match="'peft' cannot be combined with the 'pretrain' stage"):
        config_from_dict(raw)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_validate_checks_rewards_without_loading_reward_models(tmp_path):
    """A reward model's weights are loaded by the trainer, not when the recipe is validated."""
    missing = tmp_path / "no-such-reward-model"
    raw = apply_overrides(_base(), [f"grpo.rewards=[{{name: reward_model, path: {missing}}}]"])
    cfg = config_from_dict(raw)
    assert cfg.stage_options("grpo")[0].rewards[0]["path"] == str(missing)


def test_sections_check_their_own_fields_when_built():
    from align.config import EvalConfig, FieldError
    from align.trainers.grpo_config import GRPOOptions
    from align.trainers.sft_config import DiffusionSFTOptions

    with pytest.raises(FieldError, match="'remasking' must be one of low_confidence, random, margin, entropy"):
        EvalConfig(remasking="lowest")
    with pytest.raises(FieldError, match="'num_generations' must be >= 2"):
        GRPOOptions(num_generations=1)
    with pytest.raises(FieldError, match="'normalization' must be one of sequence, token, masked"):
        DiffusionSFTOptions(normalization="mean")
    assert GRPOOptions().temperature == 1.0 and EvalConfig().temperature == 0.0
