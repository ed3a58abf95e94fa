"""The diffusion-LM objectives SPG, wd1 and ESPO (align/trainers/objectives.py, docs/concepts.md §3.5): each loss
against numbers worked out by hand in plain Python, its gradient's direction, the recipe checks, and a tiny run of
each through `run_recipe`."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from align.config import ConfigError, config_from_dict
from align.likelihood import LikelihoodEstimate, MaskPlan
from align.options import FieldError
from align.trainers.grpo_config import GRPOOptions
from align.trainers.grpo_loss import objective_loss, policy_loss
from align.trainers.objectives import (
    espo_objective,
    k2_kl,
    spg_objective,
    spg_upper_bound,
    wd1_loss,
    wd1_weights,
)

BETA = 1.5
# two completions, two rows each, four positions (the last one of completion 0 and of 1 outside the loss)
POS_LOGP = [[[-1.0, -2.0, 0.0, 0.0], [0.0, -0.5, -3.0, 0.0]],
            [[-0.2, -0.4, 0.0, -9.0], [-0.3, 0.0, 0.0, 0.0]]]
COEF = [[[0.75, 0.75, 0.0, 0.0], [0.0, 1.5, 1.5, 0.0]],
        [[2.0, 2.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]


def _hand_bounds(beta=BETA):
    """(B̂_i, Û_i) of the two completions by plain arithmetic (docs/concepts.md §3.5)."""
    lower, upper = [], []
    for lp, cf, mk in zip(POS_LOGP, COEF, MASK):
        n_tok = sum(mk)
        lower.append(sum(cf[r][k] * lp[r][k] for r in range(2) for k in range(4) if mk[k]))
        u = []
        for k in range(4):
            terms = [cf[r][k] * math.exp(beta * lp[r][k]) for r in range(2) if cf[r][k] > 0]
            if mk[k] and terms:
                u.append(math.log(sum(terms)) / beta)          # (1/β) log Σ_r coef f^β
        upper.append(n_tok / len(u) * sum(u))                # |y| × mean over the positions some row scores
    return lower, upper


def _tensors():
    return (torch.tensor(POS_LOGP), torch.tensor(COEF), torch.tensor(MASK, dtype=torch.bool))


class _Guard:
    """Records what the loss hands the non-finite guard."""

    def __init__(self):
        self.parts = {}
        self.components = self

    def record(self, parts, where=None):
        self.parts.update({k: v for k, v in parts.items() if v is not None})


def _estimate(position_logp, coef, prompt_len=1):
    """A LikelihoodEstimate of a [N, V, L] plan behind a prompt of ``prompt_len`` columns (scores 0 there)."""
    N, V, L = coef.shape
    pad = torch.zeros(N, V, prompt_len)
    plp, cf = torch.cat([pad, position_logp], 2), torch.cat([pad, coef], 2)
    T = prompt_len + L
    ids = torch.zeros(N, T, dtype=torch.long)
    resp = torch.zeros(N, T, dtype=torch.bool)
    resp[:, prompt_len:] = True
    plan = MaskPlan("block", ids, torch.ones(N, T, dtype=torch.bool), resp, torch.arange(N).repeat_interleave(V),
                    cf.reshape(N * V, T) > 0, cf.reshape(N * V, T), torch.full((N * V,), 0.5), V)
    token_logp = (plp * cf).sum(1)
    return LikelihoodEstimate(token_logp.sum(1), token_logp, (plp * cf).sum(2).reshape(-1), plp.reshape(N * V, T),
                              plan)


# ---------------------------------------------------------------------------------------------- SPG
def test_spg_upper_bound_by_hand():
    plp, coef, mask = _tensors()
    lower, upper = _hand_bounds()
    got = spg_upper_bound(plp, coef, mask, BETA)
    assert torch.allclose(got, torch.tensor(upper), atol=1e-5)
    assert lower[0] == pytest.approx(-0.75 - 1.5 - 0.75 - 4.5)
    # one row masking 2 of 4 tokens (t = 1/2), coef 1/t: Û − B̂ = |y|·(1/β)·log(1/t) ≥ 0
    t = 0.5
    one = torch.tensor([[[-1.0, -2.0, 0.0, 0.0]]])
    c = torch.tensor([[[1 / t, 1 / t, 0.0, 0.0]]])
    m = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    b_hat = (1 / t) * (-1.0 - 2.0)
    u_hat = 4 / 2 * ((-1.0 + math.log(1 / t) / BETA) + (-2.0 + math.log(1 / t) / BETA))
    assert spg_upper_bound(one, c, m, BETA).item() == pytest.approx(u_hat, rel=1e-6)
    assert u_hat - b_hat == pytest.approx(4 * math.log(1 / t) / BETA)


def test_spg_objective_uses_the_lower_bound_for_positive_and_the_mixture_for_negative_advantages():
    lower, upper = _hand_bounds()
    A = torch.tensor([1.0, -2.0])
    out = spg_objective(torch.tensor(lower), torch.tensor(upper), A, 0.5)
    assert out[0].item() == pytest.approx(-1.0 * lower[0], rel=1e-6)
    assert out[1].item() == pytest.approx(2.0 * (0.5 * upper[1] + 0.5 * lower[1]), rel=1e-6)
    pure = spg_objective(torch.tensor(lower), torch.tensor(upper), A, 1.0)
    assert pure[1].item() == pytest.approx(2.0 * upper[1], rel=1e-6)


def test_spg_loss_through_policy_loss_and_its_gradient_direction():
    plp, coef, mask = _tensors()
    plp.requires_grad_(True)
    A = torch.tensor([1.0, -2.0])
    o = GRPOOptions(loss_type="spg", estimator="block", num_generations=2, spg_omega=1.0)
    ro = SimpleNamespace(prompt_len=1, advantages=A, completion_mask=mask, plans=[None], old=[None], ref=[None])
    guard = _Guard()
    loss, metrics = objective_loss(o, _estimate(plp, coef), ro, 0, guard=guard)
    lower, upper = _hand_bounds()
    n_tok = 3 + 3
    assert loss.item() == pytest.approx(-(1.0 * lower[0] + (-2.0) * upper[1]) / n_tok, rel=1e-6)
    assert metrics["spg/bound_gap"] == pytest.approx((upper[1] - lower[1]) / 3, rel=1e-5)
    assert set(guard.parts) >= {"grpo/policy", "grpo/logp", "grpo/advantages"}
    loss.backward()
    g = plp.grad
    # A > 0: ∂loss/∂log f = −A·coef/Σ|y| < 0 where a row counts (the completion is pushed up)
    assert torch.allclose(g[0], -1.0 * coef[0] * mask[0] / n_tok, atol=1e-6)
    # A < 0 with ω = 1: ∂loss/∂log f_rk = −A/Σ|y| · |y|/|S| · coef f^β / Σ_r coef f^β > 0 (pushed down, sharpest
    # rows most); position 0 is scored by both rows
    w = [COEF[1][r][0] * math.exp(BETA * POS_LOGP[1][r][0]) for r in range(2)]
    expected = [2.0 / n_tok * 3 / 2 * wr / sum(w) for wr in w]
    assert g[1, :, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert g[1, 0, 1].item() == pytest.approx(2.0 / n_tok * 3 / 2, rel=1e-5)      # one row: the whole weight
    assert (g[1] >= 0).all() and g[1, 0, 3] == 0                                  # outside the loss: no gradient


def test_spg_ignores_buffered_old_scores():
    plp, coef, mask = _tensors()
    A = torch.tensor([1.0, -2.0])
    o = GRPOOptions(loss_type="spg", estimator="block", num_generations=2)
    broken = _estimate(torch.full_like(plp, float("nan")), coef)
    ro = SimpleNamespace(prompt_len=1, advantages=A, completion_mask=mask, plans=[None, None], old=[None, broken],
                         ref=[None, None])
    a, _ = objective_loss(o, _estimate(plp, coef), ro, 0, guard=_Guard())
    b, _ = objective_loss(o, _estimate(plp, coef), ro, 1, guard=_Guard())
    assert torch.isfinite(b) and a.item() == b.item()


# ---------------------------------------------------------------------------------------------- wd1
def test_wd1_weights_by_hand():
    A = torch.tensor([0.6, 0.0, -0.6, 1.0, -0.5, -0.5])
    w_pos, w_neg = wd1_weights(A, 3, 1.0)
    z = math.exp(0.6) + math.exp(-0.6)                     # group 0: the A = 0 member is left out
    zp, zn = math.e + 2 * math.exp(-0.5), math.exp(-1) + 2 * math.exp(0.5)
    assert w_pos.tolist() == pytest.approx([math.exp(0.6) / z, 0, math.exp(-0.6) / z,
                                            math.e / zp, math.exp(-0.5) / zp, math.exp(-0.5) / zp], rel=1e-6)
    assert w_neg.tolist() == pytest.approx([math.exp(-0.6) / z, 0, math.exp(0.6) / z,
                                            math.exp(-1) / zn, math.exp(0.5) / zn, math.exp(0.5) / zn], rel=1e-6)
    # ψ sharpens: the best completion takes almost all the positive weight, the worst the negative
    sharp_pos, sharp_neg = wd1_weights(A, 3, 20.0)
    assert sharp_pos[3] > 0.99 and sharp_neg[4] + sharp_neg[5] > 0.99
    # a group whose rewards were all equal (A = 0) carries no weight at all
    flat_pos, flat_neg = wd1_weights(torch.zeros(3), 3, 1.0)
    assert flat_pos.abs().sum() == 0 and flat_neg.abs().sum() == 0


def test_wd1_loss_by_hand_and_its_gradient_direction():
    A = torch.tensor([0.6, 0.0, -0.6, 1.0, -0.5, -0.5])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5], [-3.0, -1.0], [-0.2, -0.4], [-2.0, -9.0], [-1.0, -1.0]],
                        requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    z = math.exp(0.6) + math.exp(-0.6)
    zp, zn = math.e + 2 * math.exp(-0.5), math.exp(-1) + 2 * math.exp(0.5)
    net = [(math.exp(0.6) - math.exp(-0.6)) / z, 0.0, (math.exp(-0.6) - math.exp(0.6)) / z,
           math.e / zp - math.exp(-1) / zn, math.exp(-0.5) / zp - math.exp(0.5) / zn,
           math.exp(-0.5) / zp - math.exp(0.5) / zn]
    sums = [-3.0, -1.0, -4.0, -0.6, -2.0, -2.0]             # Σ_k m·log π̂ (the −9 is outside the loss)
    expected = -sum(w * s for w, s in zip(net, sums)) / 2   # mean over the two groups
    loss, per_tok = wd1_loss(logp, A, mask, 3, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert per_tok[0, 1].item() == pytest.approx(-net[0] * -2.0, rel=1e-6)
    loss.backward()
    g = logp.grad
    assert g[0, 0].item() == pytest.approx(-net[0] / 2, rel=1e-6)
    assert (g[[0, 3]] < 0).all() and (g[[2, 5]] > 0).all() and g[4, 0] > 0   # better up, worse down
    assert (g[1] == 0).all() and g[4, 1] == 0                                 # A = 0 and masked: nothing


def test_wd1_through_policy_loss_reads_no_old_scores():
    plp, coef, mask = _tensors()
    A = torch.tensor([1.0, -1.0])
    o = GRPOOptions(loss_type="wd1", num_generations=2, wd1_psi=2.0)
    cur = _estimate(plp, coef)
    broken = _estimate(torch.full_like(plp, float("nan")), coef)
    ro = SimpleNamespace(prompt_len=1, advantages=A, completion_mask=mask, plans=[None, None], old=[None, broken],
                         ref=[None, None])
    loss, _ = objective_loss(o, cur, ro, 1, guard=_Guard())
    logp = cur.token_logp[:, 1:]
    lhs = [(logp[i] * mask[i]).sum().item() for i in range(2)]
    w = math.exp(2.0) / (math.exp(2.0) + math.exp(-2.0)) - math.exp(-2.0) / (math.exp(2.0) + math.exp(-2.0))
    assert loss.item() == pytest.approx(-(w * lhs[0] - w * lhs[1]), rel=1e-6)    # one group


# ---------------------------------------------------------------------------------------------- ESPO
def test_espo_objective_and_k2_by_hand():
    cur = torch.tensor([-10.0, -12.0], requires_grad=True)
    old = torch.tensor([-10.5, -11.0])
    ref = torch.tensor([-9.0, -12.4])
    n_tok = torch.tensor([5.0, 4.0])
    A = torch.tensor([1.0, -1.0])
    per, normalised = espo_objective(cur - old, n_tok, A, 0.2, 0.2)
    rho0 = math.exp(0.5 / 5)                                  # 1.105: inside the range; ρ_1 = e^(−1/4) = 0.779 < 0.8
    assert normalised.tolist() == pytest.approx([0.1, -0.25])
    assert per[0].item() == pytest.approx(-rho0, rel=1e-6)
    assert per[1].item() == pytest.approx(0.8, rel=1e-6)      # clipped: −min(−0.779, −0.8) = 0.8
    kl = k2_kl(cur, ref, n_tok)
    assert kl.tolist() == pytest.approx([0.5 * 1.0 / 5, 0.5 * 0.16 / 4], rel=1e-5)
    (per + 0.1 * kl).mean().backward()
    # unclipped: ∂/∂B̂ = (−A·ρ/|y| + β·(B̂ − B̂_ref)/|y|)/N; clipped: only the KL term is left
    assert cur.grad[0].item() == pytest.approx((-rho0 / 5 + 0.1 * (-1.0) / 5) / 2, rel=1e-5)
    assert cur.grad[1].item() == pytest.approx((0.1 * 0.4 / 4) / 2, rel=1e-5)


def test_espo_through_policy_loss_with_old_and_reference():
    # one row per completion, coef 1: B̂ is the sum of the row's scores over the loss positions
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    coef = mask[:, None, :].float()

    def est(rows):
        return _estimate(torch.tensor(rows)[:, None, :], coef)

    cur = est([[-1.0, -2.0, -3.0, -50.0], [-4.0, -4.0, -7.0, 0.0]])     # B̂ = −6, −8
    old = est([[-1.0, -2.0, -2.7, 0.0], [-3.0, -4.0, 0.0, 0.0]])        # B̂_old = −5.7, −7
    ref = est([[-1.0, -1.0, -3.0, 0.0], [-4.0, -4.2, 0.0, 0.0]])        # B̂_ref = −5, −8.2
    A = torch.tensor([-1.0, 2.0])
    o = GRPOOptions(loss_type="espo", estimator="elbo", num_generations=2, beta=0.5, epsilon=0.2)
    ro = SimpleNamespace(prompt_len=1, advantages=A, completion_mask=mask, plans=[None, None],
                         old=[None, old], ref=[ref, ref])
    guard = _Guard()
    loss, metrics = objective_loss(o, cur, ro, 1, guard=guard)
    rho0, rho1 = math.exp(-0.3 / 3), math.exp(-1.0 / 2)               # 0.905 (inside), 0.607 (A > 0: not clipped)
    l0, l1 = -min(-rho0, -max(rho0, 0.8)), -min(2 * rho1, 2 * max(rho1, 0.8))
    kl0, kl1 = 0.5 * 1.0 / 3, 0.5 * 0.04 / 2
    assert loss.item() == pytest.approx(((l0 + 0.5 * kl0) + (l1 + 0.5 * kl1)) / 2, rel=1e-5)
    assert metrics["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert "grpo/kl" in guard.parts
    # at k = 0 the old scores are the current ones: ρ = 1, the loss is −A on average plus the KL
    loss0, _ = objective_loss(o, cur, ro, 0, guard=_Guard())
    assert loss0.item() == pytest.approx(((1.0 + 0.5 * kl0) + (-2.0 + 0.5 * kl1)) / 2, rel=1e-5)


def test_policy_loss_routes_the_objectives(make_tiny_llada):
    # policy_loss scores the plan and hands it to objective_loss: same value as scoring it by hand
    from align.likelihood import draw_block_masks, score_plan

    model = make_tiny_llada(vocab_size=32, init_std=0.2)
    g = torch.Generator().manual_seed(0)
    P, L = 2, 6
    ids = torch.randint(0, 30, (4, P + L), generator=g)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, P:] = True
    plan = draw_block_masks(ids, resp, generator=1, block_length=3)
    ro = SimpleNamespace(prompt_len=P, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                         completion_mask=resp[:, P:], plans=[plan], old=[None], ref=[None])
    for loss_type in ("spg", "wd1", "espo"):
        o = GRPOOptions(loss_type=loss_type, estimator="block", num_generations=2, gen_length=L, block_length=3,
                        denoising_steps=L)
        loss, _ = policy_loss(o, model, ro, 0, window_tokens=None, guard=_Guard())
        by_hand, _ = objective_loss(o, score_plan(model, plan), ro, 0, guard=_Guard())
        assert torch.isfinite(loss) and loss.item() == pytest.approx(by_hand.item(), rel=1e-5), loss_type


# ---------------------------------------------------------------------------------------------- options
def test_defaults_are_the_papers():
    spg = GRPOOptions(loss_type="spg", estimator="block", block_length=8, gen_length=16, denoising_steps=16)
    assert spg.loss_args == {"spg_beta": 1.5, "spg_omega": 0.5}
    assert spg.estimator_args["block_length"] == 8                 # the masks' blocks are the rollout's
    assert GRPOOptions(loss_type="wd1").loss_args == {"wd1_psi": 1.0}
    espo = GRPOOptions(loss_type="espo", estimator="coupled")
    assert espo.loss_args == {} and espo.is_level == "sequence"
    kept = GRPOOptions(estimator="block", estimator_args={"block_length": 4})
    assert kept.estimator_args == {"block_length": 4} and kept.is_level == "sequence"


@pytest.mark.parametrize("fields,key,match", [
    ({"loss_type": "spg"}, "estimator", "must be one of block, elbo with 'loss_type' spg"),
    ({"loss_type": "espo", "estimator": "trace"}, "estimator", "must be one of elbo, coupled, block"),
    ({"loss_type": "spg", "estimator": "elbo", "beta": 0.04}, "beta", "no KL term"),
    ({"loss_type": "wd1", "beta": 0.1}, "beta", "no KL term"),
    ({"loss_type": "wd1", "importance_sampling_level": "token"}, "importance_sampling_level", "no importance ratio"),
    ({"loss_type": "espo", "estimator": "elbo", "importance_sampling_level": "token"}, "importance_sampling_level",
     "must be sequence"),
    ({"loss_type": "spg", "estimator": "block", "spg_beta": 0.5}, "spg_beta", ">= 1"),
    ({"loss_type": "spg", "estimator": "block", "spg_omega": 1.5}, "spg_omega", r"in \[0, 1\]"),
    ({"loss_type": "wd1", "wd1_psi": 0.0}, "wd1_psi", "> 0"),
    ({"loss_type": "wd1", "spg_omega": 0.5}, "spg_omega", "only applies with 'loss_type' spg"),
    ({"loss_type": "sum"}, "loss_type", "spg, wd1, espo"),
    ({"estimator": "block", "estimator_args": {"weighting": "x"}}, "estimator_args", "weighting"),
])
def test_bad_objective_settings_name_the_field(fields, key, match):
    with pytest.raises(FieldError, match=match) as err:
        GRPOOptions(**fields)
    assert err.value.key == key


def test_recipe_errors_name_the_dotted_keys(recipe):
    with pytest.raises(ConfigError, match=r"'grpo\.estimator' must be one of block, elbo with 'grpo\.loss_type' spg"):
        config_from_dict(recipe({"loss_type": "spg"}))
    with pytest.raises(ConfigError, match=r"'grpo\.beta' must be 0 with 'grpo\.loss_type' wd1"):
        config_from_dict(recipe({"loss_type": "wd1", "beta": 0.04}))
    with pytest.raises(ConfigError, match=r"'grpo\.estimator_args' is invalid: block_length"):
        config_from_dict(recipe({"estimator": "block", "estimator_args": {"block_length": 0}}))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture()
def recipe(tmp_path: Path, tiny_init_config):
    """``recipe(grpo)``: a raw two-step GRPO recipe for the tiny model, writing under ``tmp_path / "run"``."""
    from align.rewards import registry

    def digit_share(prompts, completions, completion_ids=None, **kwargs):
        return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]

    registry.register_reward("test_objective_digits", digit_share, overwrite=True)

    def make(grpo: dict) -> dict:
        base = {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2, "gen_length": 8,
                "denoising_steps": 8, "block_length": 4, "logging_steps": 1, "learning_rate": 1e-2, "save_steps": 2,
                "num_iterations": 2, "rewards": [{"name": "test_objective_digits"}]}
        return {"seed": 0, "output_dir": str(tmp_path / "run"), "stages": ["grpo"],
                "model": {"init_config": tiny_init_config(), "tokenizer": "builtin:arithmetic"},
                "data": {"task": "arithmetic", "task_args": {"num_train": 16, "num_test": 4, "seed": 0},
                         "max_length": 128},
                "grpo": {**base, **grpo}, "eval": {"enabled": False}}

    yield make
    registry._REGISTRY.pop("test_objective_digits", None)


@pytest.mark.parametrize("grpo,metric", [
    ({"loss_type": "spg", "estimator": "block", "estimator_args": {"num_samples": 2}}, "spg/bound_gap"),
    ({"loss_type": "wd1", "estimator": "one_step"}, None),
    ({"loss_type": "espo", "estimator": "elbo", "estimator_args": {"num_samples": 2}, "beta": 0.01},
     "clip_ratio/region_mean"),
])
def test_each_objective_trains_end_to_end(tmp_path, recipe, grpo, metric):
    from align.build import build_model_and_tokenizer
    from align.models import load_model
    from align.pipeline import run_recipe

    cfg = config_from_dict(recipe(grpo))
    before = build_model_and_tokenizer(cfg.model, seed=cfg.seed)[0].state_dict()
    run_recipe(cfg)
    after = load_model(str(tmp_path / "run" / "grpo" / "final")).state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)          # the update moved the weights
    state = json.loads((tmp_path / "run" / "grpo" / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [r for r in state["log_history"] if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    assert metric is None or any(metric in r for r in logs)
