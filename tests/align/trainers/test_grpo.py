"""The diffusion GRPO trainer end to end on a tiny model: each estimator, LoRA, accumulation, μ > 1, resume."""

import json
from pathlib import Path

import pytest
import torch

from align.config import config_from_dict
from align.pipeline import run_recipe
from align.rewards import register_reward


def digit_share(prompts, completions, completion_ids=None, **kwargs):
    """Share of digit characters: varies between random completions, so advantages are non-zero."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


#: prompts of every reward call of the running test (one call per micro-batch of rollouts).
SEEN: list[list[str]] = []


def recording_digit_share(prompts, completions, completion_ids=None, **kwargs):
    """digit_share that also records the prompts it is called with."""
    SEEN.append(list(prompts))
    return digit_share(prompts, completions)


@pytest.fixture(autouse=True)
def _digit_share_reward():
    """Register the test rewards for the duration of each test only (the registry is process-wide)."""
    from align.rewards import registry

    register_reward("test_digit_share", digit_share, overwrite=True)
    register_reward("test_recording", recording_digit_share, overwrite=True)
    SEEN.clear()
    yield
    registry._REGISTRY.pop("test_digit_share", None)
    registry._REGISTRY.pop("test_recording", None)


@pytest.fixture()
def recipe(tmp_path: Path, tiny_init_config):
    """``recipe(grpo, **top)``: a raw GRPO recipe for the tiny model, writing under ``tmp_path / "run"``."""

    def make(grpo: dict, **top) -> dict:
        base = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                "denoising_steps": 8, "block_length": 8, "logging_steps": 1, "learning_rate": 1e-2,
                "rewards": [{"name": "test_digit_share"}, {"name": "task_accuracy", "weight": 2.0}]}
        return {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["grpo"],
                "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
                "data": {"task": "arithmetic", "task_args": {"num_train": 32, "num_test": 8, "seed": 0},
                         "max_length": 128},
                "grpo": {**base, **grpo}, "eval": {"enabled": False}, **top}

    return make


def _log(tmp_path: Path) -> list[dict]:
    ckpts = sorted((tmp_path / "run" / "grpo").glob("checkpoint-*"))
    if ckpts:
        return json.loads((ckpts[-1] / "trainer_state.json").read_text())["log_history"]
    return []


@pytest.mark.parametrize("estimator,extra", [
    ("one_step", {"estimator_args": {"p_mask_prompt": 0.15}}),
    ("coupled", {"estimator_args": {"t_min": 0.2, "t_max": 0.8}}),
    ("elbo", {"estimator_args": {"sampler": "l_stratified", "num_samples": 2}}),
    ("trace", {"estimator_args": {"num_views": 2}}),
])
def test_each_estimator_trains(tmp_path, estimator, extra, recipe):
    raw = recipe({"estimator": estimator, "num_iterations": 2, "beta": 0.04, "save_steps": 2, **extra})
    report = run_recipe(config_from_dict(raw))
    assert "grpo" in report["stages"]
    from align.models import load_model

    model = load_model(str(tmp_path / "run" / "grpo" / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logs = _log(tmp_path)
    first = next(r for r in logs if "reward" in r)
    for key in ("rewards/digit_share/mean", "advantages/std", "frac_reward_zero_std", "clip_ratio/region_mean", "kl",
                "completions/mean_length", "rollout/time_share", "rollout/tokens_per_second"):
        assert key in first, key
    assert first["clip_ratio/region_mean"] == 0.0  # first inner iteration: ρ = 1 exactly
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # policy still equals the reference
    lines = (tmp_path / "run" / "grpo" / "completions.jsonl").read_text().splitlines()
    assert lines and {"prompt", "completion", "reward", "advantage", "column/answer"} <= set(json.loads(lines[0]))


def test_lora_with_accumulation_and_reference(tmp_path, recipe):
    raw = recipe({"gradient_accumulation_steps": 2, "beta": 0.1, "num_iterations": 1, "save_steps": 2},
                 peft={"r": 4, "lora_alpha": 8})
    run_recipe(config_from_dict(raw))
    assert (tmp_path / "run" / "grpo" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "grpo" / "final" / "config.json").exists()
    logs = _log(tmp_path)
    assert [r["step"] for r in logs if "loss" in r] == [1, 2]


def test_resume_continues_the_run(tmp_path, recipe, caplog):
    import shutil

    raw = recipe({"save_steps": 2, "num_iterations": 1, "max_steps": 4})
    run_recipe(config_from_dict(raw))
    stage = tmp_path / "run" / "grpo"
    for name in ("checkpoint-4", "final"):                 # as if stopped after step 2: not finished yet
        shutil.rmtree(stage / name)
    (tmp_path / "run" / "report.json").unlink()
    caplog.set_level("INFO", logger="align.pipeline.stage")
    run_recipe(config_from_dict(raw))
    assert f"resuming grpo from {stage / 'checkpoint-2'}" in caplog.text
    logs = _log(tmp_path)
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]


def test_num_iterations_uses_every_prompt_the_loader_yields(tmp_path, recipe):
    # 8 prompts, 2 per micro-batch, 2 micro-batches per step: one epoch is 2 rollout windows of 4 prompts, each
    # trained on for μ = 2 steps. Every prompt must be rolled out once, none drawn and left unused.
    raw = recipe({"num_iterations": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "save_steps": 4,
                  "rewards": [{"name": "test_recording"}]})
    raw["data"]["task_args"]["num_train"] = 8
    run_recipe(config_from_dict(raw))
    from align.data.task import arithmetic_dataset

    prompts = list(arithmetic_dataset(8, 8, seed=0)["train"]["prompt"])
    assert len(SEEN) == 4                                  # 2 windows x 2 micro-batches, rolled out once each
    flat = [p for call in SEEN for p in call]
    assert sorted(flat) == sorted(prompts * 2)             # every prompt, G = 2 completions each
    state = json.loads((tmp_path / "run" / "grpo" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.0)            # 4 steps = one pass over the 8 prompts
    logs = [r for r in state["log_history"] if "loss" in r]
    assert [("reward" in r) for r in logs] == [True, False, True, False]  # rewards only where rollouts happen


def test_resume_inside_a_cycle_is_bit_identical(tmp_path, recipe):
    from safetensors.torch import load_file

    raw = recipe({"num_iterations": 2, "gradient_accumulation_steps": 2, "max_steps": 4, "save_steps": 1,
                  "lr_scheduler_type": "constant", "beta": 0.04, "loss_type": "dapo"})
    run_recipe(config_from_dict(raw))
    stage = tmp_path / "run" / "grpo"
    whole = load_file(stage / "final" / "model.safetensors")
    losses = [r["loss"] for r in _log(tmp_path) if "loss" in r]
    assert (stage / "checkpoint-1" / "grpo_rollouts-rank0.pt").is_file()    # step 1 is inner iteration 1 of 2
    assert not (stage / "checkpoint-2" / "grpo_rollouts-rank0.pt").exists()  # step 2 starts a new cycle
    import shutil

    for name in ("checkpoint-2", "checkpoint-3", "checkpoint-4", "final"):
        shutil.rmtree(stage / name)
    (tmp_path / "run" / "report.json").unlink()
    run_recipe(config_from_dict(raw))                      # resumes from checkpoint-1, inside the first cycle
    resumed = load_file(stage / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["loss"] for r in _log(tmp_path) if "loss" in r] == losses


@pytest.mark.parametrize("loss_type,extra,metric", [
    ("cispo", {"epsilon_high": 5.0}, "cispo_clip_ratio"),
    ("sapo", {"sapo_temperature_neg": 1.2}, None),
    ("luspo", {"estimator": "elbo", "estimator_args": {"num_samples": 2}}, "clip_ratio/region_mean"),
    ("vespo", {"estimator": "elbo", "estimator_args": {"num_samples": 2}}, "vespo/phi_seq_mean"),
])
def test_trl_loss_types_train(tmp_path, recipe, loss_type, extra, metric):
    raw = recipe({"loss_type": loss_type, "num_iterations": 2, "beta": 0.04, "save_steps": 2, **extra})
    run_recipe(config_from_dict(raw))
    from align.models import load_model

    model = load_model(str(tmp_path / "run" / "grpo" / "final"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logs = [r for r in _log(tmp_path) if "loss" in r]
    assert len(logs) == 2 and all(r["loss"] == r["loss"] for r in logs)
    if metric is not None:
        assert all(metric in r for r in logs)
    assert all("clip_ratio/region_mean" not in r for r in logs) or loss_type == "luspo"


def test_bad_grpo_settings_are_named(tmp_path, recipe):
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        config_from_dict(recipe({"per_device_train_batch_size": 5}))
    with pytest.raises(ConfigError, match=r"'grpo\.loss_type'"):
        config_from_dict(recipe({"loss_type": "sum"}))
    with pytest.raises(ConfigError, match=r"grpo\.rewards"):
        config_from_dict(recipe({"rewards": [{"name": "no_such_reward"}]}))
    with pytest.raises(ConfigError, match=r"grpo\.estimator_args"):
        config_from_dict(recipe({"estimator": "elbo", "estimator_args": {"sampler": "bogus"}}))
    with pytest.raises(ConfigError, match=r"'grpo\.negative_advantage_scale'"):
        config_from_dict(recipe({"negative_advantage_scale": 1.5}))
    with pytest.raises(ConfigError, match=r"'grpo\.vespo_k_pos' only applies with 'grpo\.loss_type' vespo"):
        config_from_dict(recipe({"loss_type": "dapo", "vespo_k_pos": 1.0}))
    with pytest.raises(ConfigError, match=r"'grpo\.epsilon_high' is required with 'grpo\.loss_type' cispo"):
        config_from_dict(recipe({"loss_type": "cispo"}))


def test_negative_advantage_scale_zero_keeps_only_positive_advantages(tmp_path, recipe):
    raw = recipe({"negative_advantage_scale": 0.0, "max_steps": 3, "save_steps": 3,
                  "rewards": [{"name": "test_digit_share"}]})
    run_recipe(config_from_dict(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert rows and all(r["advantage"] >= 0 for r in rows) and any(r["advantage"] > 0 for r in rows)
    logs = [r for r in _log(tmp_path) if "advantages/mean" in r]
    assert logs and all(r["advantages/mean"] >= 0 for r in logs)


def test_completion_loss_mask_eos_fill_and_truncation():
    from align.trainers.grpo import completion_loss_mask

    lengths = torch.tensor([2, 5, 0])  # tokens before the first stop; 5 = no stop within L = 5
    whole = completion_loss_mask(lengths, 5)
    assert whole.all()  # the EOS fill after the stop is scored too
    to_stop = completion_loss_mask(lengths, 5, eos_fill_in_loss=False)
    assert to_stop.tolist() == [[True, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    no_trunc = completion_loss_mask(lengths, 5, mask_truncated=True)
    assert no_trunc.tolist() == [[True] * 5, [False] * 5, [True] * 5]


def test_skipping_zero_advantage_completions_leaves_the_gradient_unchanged(make_tiny_llada):
    # without a KL term the trainer scores only completions with A_i != 0 (MaskPlan.restricted_to); the loss
    # and its gradient must be those of scoring every completion
    from align.likelihood import draw_coupled_masks, score_plan
    from align.trainers.grpo_math import aggregate, clipped_surrogate

    model = make_tiny_llada(vocab_size=32, init_std=0.2)
    g = torch.Generator().manual_seed(0)
    P, L = 3, 5
    ids = torch.randint(0, 30, (4, P + L), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, P:] = True
    A = torch.tensor([1.2, -0.7, 0.0, 0.0])
    plan = draw_coupled_masks(ids, resp, generator=1)

    def loss_and_grad(p):
        model.zero_grad()
        logp = score_plan(model, p).token_logp[:, P:]
        per_tok, _ = clipped_surrogate(logp, logp.detach(), A[:, None], 0.2, 0.2)
        loss = aggregate(per_tok, resp[:, P:], "grpo", L)
        loss.backward()
        return loss.detach(), torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])

    (l_full, g_full), (l_part, g_part) = loss_and_grad(plan), loss_and_grad(plan.restricted_to(A != 0))
    assert torch.allclose(l_full, l_part) and g_full.abs().max() > 0
    assert torch.allclose(g_full, g_part, atol=1e-6)
