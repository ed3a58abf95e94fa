"""VRPO: the preference losses against hand-computed values, shared masks, the estimator variance, and the stage end
to end through the CLI (LoRA, a frozen-copy reference, precomputed reference estimates, resume)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main
from align.config import ConfigError, config_from_dict
from align.likelihood import draw_elbo_masks, score_plan
from align.trainers.vrpo_math import combined_loss, preference_loss, score_variance, stack_plans

pytestmark = pytest.mark.usefixtures("one_thread")

# fixed estimates: pair 0 prefers the chosen response more than the reference does, pair 1 less
POLICY = torch.tensor([[-10.0, -14.0], [-20.0, -18.0]])
REFERENCE = torch.tensor([[-11.0, -13.0], [-19.0, -18.5]])
LENGTHS = torch.tensor([[4, 8], [5, 2]])


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_losses_equal_hand_computed_values():
    # h = (π_w − ref_w) − (π_l − ref_l): pair 0: (1) − (−1) = 2; pair 1: (−1) − (0.5) = −1.5
    h, beta, eps = [2.0, -1.5], 0.5, 0.1

    def run(loss_type, label_smoothing=0.0):
        return preference_loss(POLICY, REFERENCE, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                               lengths=LENGTHS).losses.tolist()

    assert run("sigmoid") == pytest.approx([-_log_sigmoid(beta * x) for x in h])
    assert run("sigmoid", eps) == pytest.approx([-(1 - eps) * _log_sigmoid(beta * x) - eps * _log_sigmoid(-beta * x)
                                                 for x in h])
    assert run("robust", eps) == pytest.approx([(-(1 - eps) * _log_sigmoid(beta * x) + eps * _log_sigmoid(-beta * x))
                                                / (1 - 2 * eps) for x in h])
    assert run("hinge") == pytest.approx([max(0.0, 1 - beta * x) for x in h])
    # IPO on per-token log-ratios: pair 0: 1/4 − (−1/8) = 0.375; pair 1: −1/5 − 0.5/2 = −0.45; target 1/(2β) = 1
    assert run("ipo") == pytest.approx([(0.375 - 1.0) ** 2, (-0.45 - 1.0) ** 2])
    out = preference_loss(POLICY, REFERENCE, loss_type="sigmoid", beta=beta)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])
    assert out.margins.tolist() == pytest.approx(h)


def test_combined_losses_add_up_with_their_weights():
    out = combined_loss(POLICY, REFERENCE, LENGTHS, loss_types=["sigmoid", "sft"], weights=[1.0, 0.5], beta=0.5)
    nll = (10.0 + 20.0) / (4 + 5)                             # −Σ B̂_θ(y_w) / Σ L_w over the batch
    assert out.losses.tolist() == pytest.approx([-_log_sigmoid(0.5 * x) + 0.5 * nll for x in (2.0, -1.5)])
    assert out.margins.tolist() == pytest.approx([2.0, -1.5])


def test_sigmoid_gradient_equals_the_hand_derivative():
    policy = POLICY.clone().requires_grad_(True)
    preference_loss(policy, REFERENCE, loss_type="sigmoid", beta=0.5).losses.sum().backward()
    # d/dπ_w of −log σ(β h) = −β σ(−β h); the rejected side gets the opposite
    g = [0.5 / (1 + math.exp(0.5 * x)) for x in (2.0, -1.5)]
    assert policy.grad.flatten().tolist() == pytest.approx([-g[0], g[0], -g[1], g[1]])


def test_bad_loss_settings_are_rejected():
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        preference_loss(POLICY, REFERENCE, loss_type="hinge", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="ipo loss needs the response lengths"):
        preference_loss(POLICY, REFERENCE, loss_type="ipo", beta=0.1)


def _pair_tensors():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (4, 14), generator=g)
    resp = torch.zeros(4, 14, dtype=torch.bool)
    resp[:, 6:] = True
    att = torch.ones(4, 14, dtype=torch.bool)
    for seq, end in ((0, 12), (1, 11)):      # pair 0 is shorter than the batch (right padding, not attended)
        resp[seq, end:] = att[seq, end:] = False
    return ids, att, resp


@pytest.mark.parametrize("sampler", ["t", "l_stratified"])
def test_shared_masks_give_identical_estimates_when_weights_are_equal(make_tiny_llada, sampler):
    policy = make_tiny_llada(seed=1)
    reference = copy.deepcopy(policy)
    ids, att, resp = _pair_tensors()
    plan = draw_elbo_masks(ids, resp, attention_mask=att, generator=7, sampler=sampler, num_samples=4)
    with torch.no_grad():
        cur, ref = score_plan(policy, plan), score_plan(reference, plan)
        other = score_plan(reference, draw_elbo_masks(ids, resp, attention_mask=att, generator=8, sampler=sampler,
                                                      num_samples=4))
    assert torch.equal(cur.seq_logp, ref.seq_logp) and torch.equal(cur.row_logp, ref.row_logp)
    rows = (2, 2, 4)
    out = preference_loss(cur.seq_logp.view(2, 2), ref.seq_logp.view(2, 2), loss_type="sigmoid", beta=0.1)
    assert out.margins.tolist() == [0.0, 0.0] and out.losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert score_variance(cur.row_logp.view(rows), ref.row_logp.view(rows), 0.1).tolist() == [0.0, 0.0]
    # independent draws for the reference: the same weights no longer give the same estimates
    assert not torch.equal(cur.seq_logp, other.seq_logp)
    assert (score_variance(cur.row_logp.view(rows), other.row_logp.view(rows), 0.1) > 0).all()


def test_score_variance_is_n_times_the_spread_of_the_per_view_terms():
    policy_rows = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    reference_rows = torch.zeros(1, 2, 3)
    # a_j = β · (1, 2, 3) with β = 2: sample variance of (2, 4, 6) is 4; n · 4 = 12
    assert score_variance(policy_rows, reference_rows, 2.0).tolist() == [12.0]
    assert math.isnan(score_variance(policy_rows[..., :1], reference_rows[..., :1], 2.0).item())


def test_stacked_plans_score_like_their_parts(make_tiny_llada):
    model = make_tiny_llada(seed=2)
    ids, att, resp = _pair_tensors()
    first = draw_elbo_masks(ids[:2, :12], resp[:2, :12], attention_mask=att[:2, :12], generator=1, num_samples=3)
    second = draw_elbo_masks(ids[2:], resp[2:], attention_mask=att[2:], generator=2, num_samples=3)
    with torch.no_grad():
        whole = score_plan(model, stack_plans([first, second], ids, att, resp))
        parts = torch.cat([score_plan(model, first).seq_logp, score_plan(model, second).seq_logp])
    assert torch.allclose(whole.seq_logp, parts, atol=1e-5)


# ---------------------------------------------------------------------------------------------- end to end
def _recipe(tmp_path: Path, tiny_init_config, vrpo: dict, **top) -> Path:
    raw = {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["vrpo"],
           "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "data": {"task": "arithmetic", "task_args": {"num_train": 24, "num_test": 6, "seed": 0}, "max_length": 128},
           "vrpo": {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                    "num_samples": 2, "logging_steps": 1, "learning_rate": 1e-2, "save_steps": 2,
                    "eval_pairs": 6, "eval_num_samples": 2, **vrpo},
           "eval": {"enabled": False}, **top}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _logs(tmp_path: Path) -> list[dict]:
    ckpt = sorted((tmp_path / "run" / "vrpo").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    return [r for r in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in r]


@pytest.mark.parametrize("case", ["lora", "frozen_copy", "precomputed"])
def test_vrpo_stage_runs_end_to_end(tmp_path, tiny_init_config, case):
    vrpo = {"reference": "precomputed"} if case == "precomputed" else {}
    top = {"peft": {"r": 4, "lora_alpha": 8}} if case == "lora" else {}
    assert main(["run", str(_recipe(tmp_path, tiny_init_config, vrpo, **top))]) == 0
    stage = tmp_path / "run" / "vrpo"
    assert (stage / "final" / "config.json").is_file()
    assert (stage / "adapter" / "adapter_config.json").is_file() == (case == "lora")
    logs = _logs(tmp_path)
    assert [r["step"] for r in logs] == [1, 2]
    first = logs[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "preference/score_variance"):
        assert key in first, key
    # step 1: the policy is the reference and both score the same draws, so every margin is exactly 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["preference/score_variance"] == 0.0
    assert logs[1]["rewards/margins"] != 0.0
    report = json.loads((stage / "preference_eval.json").read_text())
    assert report["pairs"] == 6 and report["before"]["reward_accuracy"] == 0.0
    assert {"accuracy", "reward_accuracy", "mean_margin"} <= set(report["after"])
    assert report["accuracy_after_vs_before"]["n"] == 6


def _run_from_seed(recipe: Path) -> int:
    """``dlm-align run`` with the random init of ``model.init_config`` drawn from seed 0, as in a fresh process."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return main(["run", str(recipe)])


def test_vrpo_resume_continues_with_the_same_draws(tmp_path, tiny_init_config):
    constant = {"lr_scheduler_type": "constant"}                 # the 2-step run's schedule is the 4-step run's
    straight = tmp_path / "straight"
    straight.mkdir()
    assert _run_from_seed(_recipe(straight, tiny_init_config, {**constant, "max_steps": 4, "save_steps": 4})) == 0
    assert _run_from_seed(_recipe(tmp_path, tiny_init_config, {**constant, "max_steps": 4})) == 0
    import shutil

    for name in ("checkpoint-4", "final"):                       # as if stopped after step 2: train it further
        shutil.rmtree(tmp_path / "run" / "vrpo" / name)
    (tmp_path / "run" / "report.json").unlink()
    assert _run_from_seed(_recipe(tmp_path, tiny_init_config, {**constant, "max_steps": 4})) == 0
    resumed, reference = _logs(tmp_path), _logs(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


@pytest.mark.parametrize("override,needle", [
    ({"vrpo": {"loss_type": "hinge", "label_smoothing": 0.1}}, "'vrpo.label_smoothing' applies to 'vrpo.loss_type'"),
    ({"vrpo": {"loss_type": "dpo"}}, "'vrpo.loss_type' must be one of sigmoid, robust, ipo, hinge, sft"),
    ({"vrpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}},
     "'vrpo.loss_weights' needs one weight per loss type (2), got 1"),
    ({"vrpo": {"sampler": "quadrature", "num_samples": 1}}, "'vrpo.num_samples' does not suit 'vrpo.sampler'"),
    ({"vrpo": {"reference": "copy"}}, "'vrpo.reference' must be one of model, precomputed"),
    ({"vrpo": {"beta": 0}}, "'vrpo.beta' must be > 0"),
    ({"data": {"task": None, "train_files": ["x.jsonl"], "format": "messages"}},
     "so 'data.format' must be 'auto', got 'messages'"),
    ({"data": {"task": None, "train_files": ["x.jsonl"]}, "vrpo": {"task_rejected": "wrong"}},
     "'vrpo.task_rejected' applies to pairs made from the built-in task"),
    ({"data": {"task": None, "train_files": ["x.jsonl"]}, "vrpo": {"eval_pairs": 10}},
     "'vrpo.eval_pairs' needs held-out preference rows"),
])
def test_bad_vrpo_settings_are_named(tiny_init_config, override, needle):
    raw = {"stages": ["vrpo"], "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
           "eval": {"enabled": False}, "vrpo": {}}
    for key, value in override.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert needle in str(err.value)


@pytest.mark.parametrize("name", ["llada/vrpo-lora", "illada/vrpo-lora"])
def test_validate_prints_the_vrpo_memory_estimate(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))              # empty: nothing is downloaded
    rows = tmp_path / "prefs.jsonl"
    rows.write_text(json.dumps({"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    main(["validate", name, f"data.train_files=[{rows}]", "--nproc", "8"])
    out = capsys.readouterr().out
    assert "memory per GPU, stage vrpo (" in out and "data: " not in out   # the row is read as a pair
    assert "16 x 1024 tokens" in out                                        # 1 pair x 2 sequences x 8 views
    assert "\n  output head " in out and "\n  total " in out and "reference model" not in out   # LoRA: no copy
