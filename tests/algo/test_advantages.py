import math

import pytest
import torch
from torch.testing import assert_close

from agpo_megatron.algo.advantages import agpo_advantages, compute_advantages, grpo_advantages, rloo_advantages

SQRT3_OVER_2 = math.sqrt(3.0) / 2.0  # 0.8660254...


def test_grpo_two_of_four_correct_hand_values():
    # mean 0.5, unbiased var (4 * 0.25) / 3 = 1/3, std 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    adv, _ = grpo_advantages(rewards, eps=0.0)
    expected = torch.tensor([[SQRT3_OVER_2, -SQRT3_OVER_2, -SQRT3_OVER_2, SQRT3_OVER_2]])
    assert_close(adv, expected)

    # The default eps only nudges the denominator: 0.5 / (0.5773503 + 1e-6) = 0.8660239
    adv, _ = grpo_advantages(rewards)
    assert_close(adv, expected * 0.5773503 / (0.5773503 + 1e-6), atol=1e-6, rtol=0)


def test_grpo_one_of_four_correct_hand_values():
    # mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    adv, _ = grpo_advantages(rewards, eps=0.0)
    assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))


def test_drgrpo_does_not_divide_by_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    adv, _ = grpo_advantages(rewards, scale_by_std=False)
    assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0.5, -0.5, -0.5, 0.5]]))


def test_grpo_uniform_groups_are_exactly_zero():
    # The mean of three 0.1s is not exactly 0.1 in float32; without the guard the rounding error
    # would be divided by eps.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv, metrics = grpo_advantages(rewards, eps=0.0)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert torch.isfinite(adv).all()
    assert_close(metrics["frac_uniform_groups"], torch.tensor(2 / 3))


def test_agpo_uniform_groups_get_plus_minus_one_or_zero():
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all correct -> +1
            [0.0, 0.0, 0.0, 0.0],  # all wrong -> -1
            [0.5, 0.5, 0.5, 0.5],  # uniform strictly inside (r_min, r_max) -> 0
            [1.0, 0.0, 0.0, 1.0],  # mixed -> GRPO
        ]
    )
    adv, metrics = agpo_advantages(rewards, eps=0.0)
    expected = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],
            [-1.0, -1.0, -1.0, -1.0],
            [0.0, 0.0, 0.0, 0.0],
            [SQRT3_OVER_2, -SQRT3_OVER_2, -SQRT3_OVER_2, SQRT3_OVER_2],
        ]
    )
    assert_close(adv, expected)
    assert_close(metrics["frac_uniform_groups"], torch.tensor(0.75))
    assert_close(metrics["frac_uniform_pos"], torch.tensor(0.25))
    assert_close(metrics["frac_uniform_neg"], torch.tensor(0.25))
    assert_close(metrics["adv_abs_max"], torch.tensor(1.0))
    assert_close(metrics["adv_mean"], torch.tensor(0.0))
    assert_close(metrics["adv_std"], expected.std())


def test_agpo_is_nan_free_on_uniform_groups_even_with_zero_eps():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.3, 0.3]])
    for eps in (0.0, 1e-6):
        adv, metrics = agpo_advantages(rewards, eps=eps)
        assert torch.isfinite(adv).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())
        assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]))


def test_agpo_float_tolerance_counts_near_bounds_as_bounds():
    rewards = torch.tensor([[0.9999999, 0.9999999, 1.0], [1e-7, 0.0, 1e-7]])
    adv, metrics = agpo_advantages(rewards)
    assert_close(adv, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
    assert_close(metrics["frac_uniform_groups"], torch.tensor(1.0))

    # Outside the tolerance the group has variance and GRPO applies: mean 0.5, std 0.5 / sqrt(.5)
    adv, _ = agpo_advantages(torch.tensor([[0.999, 0.001]]), eps=0.0)
    assert_close(adv, torch.tensor([[1 / math.sqrt(2.0), -1 / math.sqrt(2.0)]]))


def test_agpo_custom_reward_range():
    rewards = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    adv, _ = agpo_advantages(rewards, r_min=-1.0, r_max=2.0)
    assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_agpo_without_std_scaling_keeps_unit_constants():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv, _ = agpo_advantages(rewards, scale_by_std=False)
    assert_close(adv, torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.75, -0.25, -0.25, -0.25]]))


def test_compute_advantages_dispatch():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert_close(compute_advantages(rewards, "grpo")[0], grpo_advantages(rewards)[0])
    assert_close(compute_advantages(rewards, "drgrpo")[0], grpo_advantages(rewards, scale_by_std=False)[0])
    assert_close(compute_advantages(rewards, "agpo", tol=1e-3)[0], agpo_advantages(rewards, tol=1e-3)[0])
    # The estimators differ exactly on the uniform group.
    assert_close(compute_advantages(rewards, "grpo")[0][1], torch.zeros(4))
    assert_close(compute_advantages(rewards, "agpo")[0][1], torch.ones(4))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: compute_advantages(torch.zeros(2, 2), "ppo"), "estimator"),
        (lambda: compute_advantages(torch.zeros(2, 2), "grpo", scale_by_std=False), "scale_by_std"),
        (lambda: grpo_advantages(torch.zeros(3, 1)), r"G=1"),
        (lambda: agpo_advantages(torch.zeros(3, 1)), r"G=1"),
        (lambda: grpo_advantages(torch.zeros(4)), r"\(4,\)"),
        (lambda: agpo_advantages(torch.zeros(2, 2, 2)), r"\(2, 2, 2\)"),
        (lambda: grpo_advantages(torch.zeros(2, 2, dtype=torch.long)), "floating-point"),
        (lambda: grpo_advantages(torch.zeros(2, 2), eps=-1.0), "eps"),
        (lambda: agpo_advantages(torch.zeros(2, 2), tol=-1.0), "tol"),
        (lambda: agpo_advantages(torch.zeros(2, 2), r_min=1.0, r_max=1.0), "r_max"),
    ],
)
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rloo_leave_one_out_hand_values_and_jacobian():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    adv, m = rloo_advantages(rewards)
    # r_i minus the mean of the other three.
    expected = torch.tensor(
        [[1.0, -1 / 3, -1 / 3, -1 / 3], [1 - 1.5 / 3, 1 - 1.5 / 3, 0 - 2.5 / 3, 0.5 - 2 / 3], [0.0, 0.0, 0.0, 0.0]]
    )
    assert_close(adv, expected)
    assert adv[2].eq(0).all()  # exactly, not one ulp off
    assert_close(m["frac_uniform_groups"], torch.tensor(1 / 3))
    # The baseline does not depend on the sample it is subtracted from: dA_i/dr_i = 1,
    # dA_i/dr_j = -1/(G-1) (GRPO's / Dr.GRPO's mean baseline would give 1 - 1/G = 0.75 and -1/G).
    (grad_row,) = torch.autograd.grad(adv[1, 0], rewards)
    assert_close(grad_row[1], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert grad_row[0].eq(0).all() and grad_row[2].eq(0).all()
    assert_close(compute_advantages(rewards, "rloo")[0], adv)
    with pytest.raises(ValueError, match="G=1"):
        rloo_advantages(torch.zeros(3, 1))
