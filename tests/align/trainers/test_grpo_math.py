"""GRPO maths: advantages, clipped surrogate, k3 KL, loss aggregation (algorithms.md section 3)."""

import math

import pytest
import torch

from align.trainers.grpo_math import aggregate, clipped_surrogate, constant_groups, group_advantages, k3_kl


def test_group_advantages_mean_and_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    A = group_advantages(r, 4, scale_rewards="none")
    assert torch.allclose(A, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    As = group_advantages(r, 4, scale_rewards="group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(As[:4], A[:4] / (std + 1e-4))
    assert torch.allclose(As[4:], torch.zeros(4))  # equal rewards: no signal, no blow-up
    Ab = group_advantages(r, 4, scale_rewards="batch")
    assert torch.allclose(Ab, A / (r.std() + 1e-4))


def test_groups_of_equal_rewards_get_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.1, float("nan"), 0.7, float("nan")])
    assert constant_groups(r, 2).tolist() == [True, False, True, True]
    for scale in ("group", "batch", "none"):
        A = group_advantages(r, 2, scale_rewards=scale)
        assert torch.equal(A[[0, 1, 4, 5, 6, 7]], torch.zeros(6))   # no rounding residue from the group mean
        assert A[2] < 0 < A[3]


def test_leave_one_out_and_nan_rewards():
    r = torch.tensor([3.0, 1.0, 2.0])
    A = group_advantages(r, 3, scale_rewards="none", baseline="leave_one_out")
    assert torch.allclose(A, torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0]))
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    A = group_advantages(r, 4, scale_rewards="none")
    mean = 2 / 3
    assert A[1] == 0 and math.isclose(A[0].item(), 1 - mean, rel_tol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 4)


def test_clipped_surrogate_ratio_one_and_clipping():
    logp = torch.tensor([-1.0, -1.0, -1.0])
    A = torch.tensor([1.0, -1.0, 2.0])
    loss, clipped = clipped_surrogate(logp, logp.clone(), A, 0.2, 0.2)
    assert torch.allclose(loss, -A) and not clipped.any()
    # ρ = e^{0.5} ≈ 1.65 > 1.2: positive advantage is clipped, negative is not
    loss, clipped = clipped_surrogate(logp + 0.5, logp, A, 0.2, 0.3)
    rho = math.exp(0.5)
    assert math.isclose(loss[0].item(), -1.3, rel_tol=1e-6)
    assert math.isclose(loss[1].item(), rho, rel_tol=1e-6)
    assert clipped.tolist() == [True, False, True]


def test_k3_kl_properties():
    x = torch.linspace(-3, 0, 7)
    assert torch.allclose(k3_kl(x, x), torch.zeros(7))
    assert (k3_kl(x, x - 0.3) > 0).all() and (k3_kl(x, x + 0.3) > 0).all()


def test_aggregate_loss_types():
    per = torch.tensor([[1.0, 1.0, 5.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert math.isclose(aggregate(per, m, "grpo", 3).item(), (1.0 + 2.0) / 2, rel_tol=1e-6)
    assert math.isclose(aggregate(per, m, "bnpo", 3).item(), 4.0 / 3, rel_tol=1e-6)
    assert math.isclose(aggregate(per, m, "dr_grpo", 3).item(), 4.0 / 6, rel_tol=1e-6)
    with pytest.raises(ValueError):
        aggregate(per, m, "x", 3)
