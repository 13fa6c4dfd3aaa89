import pytest
import torch
from torch.testing import assert_close

from agpo_megatron.algo.advantages import agpo_advantages
from agpo_megatron.algo.rewards import combine_rewards, length_reward, overlong_penalty


def _len_reward(correct: list[int], lengths: list[float]) -> torch.Tensor:
    r_len, _ = length_reward(torch.tensor([correct], dtype=torch.bool), torch.tensor([lengths]))
    return r_len[0]


def test_all_correct_group_gets_no_length_reward():
    assert_close(_len_reward([1, 1, 1, 1], [10, 20, 30, 40]), torch.zeros(4))


def test_all_wrong_group_gets_no_length_reward():
    assert_close(_len_reward([0, 0, 0, 0], [10, 20, 30, 40]), torch.zeros(4))


def test_single_correct_answer_gets_lambda_one():
    assert_close(_len_reward([0, 1, 0, 0], [5, 7, 9, 11]), torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_two_correct_with_different_lengths_get_one_and_zero():
    # The wrong answers are shorter than both correct ones and must not enter min / max.
    assert_close(_len_reward([1, 0, 1, 0], [10, 3, 30, 1]), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_several_correct_interpolate_linearly():
    # min 10, max 30 over correct answers: 1 - (L - 10) / 20 -> 1, 0.5, 0; the wrong one gets 0.
    assert_close(_len_reward([1, 1, 1, 0], [10, 20, 30, 40]), torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_equal_correct_lengths_get_lambda_one():
    assert_close(_len_reward([1, 1, 0, 0], [7, 7, 7, 3]), torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_batched_groups_and_metrics():
    correct = torch.tensor(
        [
            [1, 1, 1, 0],  # mixed: [1, .5, 0, 0]
            [1, 1, 1, 1],  # all correct: zeros
            [0, 0, 0, 0],  # all wrong: zeros
            [0, 1, 0, 0],  # mixed, single correct: [0, 1, 0, 0]
        ],
        dtype=torch.bool,
    )
    lengths = torch.tensor([[10, 20, 30, 40], [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])  # int lengths
    r_len, metrics = length_reward(correct, lengths)
    expected = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4, [0.0, 1.0, 0.0, 0.0]])
    assert r_len.dtype == torch.float32
    assert_close(r_len, expected)
    # Mean over the 4 correct answers of mixed groups: (1 + .5 + 0 + 1) / 4
    assert_close(metrics["len_reward_mean"], torch.tensor(0.625))
    assert_close(metrics["num_len_reward_groups"], torch.tensor(2.0))
    assert_close(metrics["frac_len_reward_groups"], torch.tensor(0.5))  # 2 of 4 groups: where m2 fires


def test_metrics_without_mixed_groups_are_zero():
    correct = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    _, metrics = length_reward(correct, torch.tensor([[3, 4], [5, 6]]))
    assert_close(metrics["len_reward_mean"], torch.tensor(0.0))
    assert_close(metrics["num_len_reward_groups"], torch.tensor(0.0))
    assert_close(metrics["frac_len_reward_groups"], torch.tensor(0.0))


def test_combine_rewards_gamma_point_one():
    r_acc = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    r_len = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    assert_close(combine_rewards(r_acc, r_len, 0.1), torch.tensor([[1.1, 1.05, 1.0, 0.0]]))
    assert_close(combine_rewards(r_acc, r_len, 0.0), r_acc)


def test_length_reward_then_agpo_advantage_prefers_shorter_correct_answers():
    correct = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lengths = torch.tensor([[10, 20, 30, 40], [10, 20, 30, 40]])
    r_len, _ = length_reward(correct, lengths)
    rewards = combine_rewards(correct.float(), r_len, 0.1)
    adv, _ = agpo_advantages(rewards)

    assert adv[0, 0] > adv[0, 1] > adv[0, 2] > 0 > adv[0, 3]
    # The all-correct group keeps AGPO's +1: it received no length reward, so it stays uniform.
    assert_close(adv[1], torch.ones(4))
    # Hand check of the mixed group: rewards [1.1, 1.05, 1, 0], mean 0.7875
    centered = torch.tensor([0.3125, 0.2625, 0.2125, -0.7875])
    assert_close(adv[0], centered / (centered.square().sum() / 3).sqrt(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: combine_rewards(torch.zeros(1, 2), torch.zeros(1, 2), -0.1), "gamma"),
        (lambda: combine_rewards(torch.zeros(1, 2), torch.zeros(2, 1), 0.1), "same shape"),
        (lambda: combine_rewards(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 0.1), "r_acc"),
        (lambda: length_reward(torch.ones(1, 2), torch.ones(1, 2)), "bool"),
        (lambda: length_reward(torch.ones(2, dtype=torch.bool), torch.ones(2)), "2-D"),
        (lambda: length_reward(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3)), "lengths"),
    ],
)
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_overlong_penalty_dapo_ramp_by_hand():
    # L_max 100, buffer 20: 0 up to 80, then -(L - 80) / 20, -1 at 100.
    lengths = torch.tensor([[10, 80, 81, 90], [99, 100, 100, 50]])
    r_over, m = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=1.0)
    expected = torch.tensor([[0.0, 0.0, -0.05, -0.5], [-0.95, -1.0, -1.0, 0.0]])
    assert_close(r_over, expected)
    assert_close(m["frac_overlong_punished"], torch.tensor(5 / 8))
    assert_close(m["overlong_penalty_mean"], expected.mean())
    half, _ = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=0.5)
    assert_close(half, 0.5 * expected)
    with pytest.raises(ValueError, match="buffer_tokens"):
        overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=100, penalty=1.0)


def test_length_reward_then_overlong_penalty_compose_in_that_order():
    """r = r_acc + gamma * r_len + r_over: m2 sees accuracy and lengths only, the punishment is added after."""
    r_acc = torch.tensor([[1.0, 1.0, 0.0]])
    lengths = torch.tensor([[60, 95, 100]])
    r_len, _ = length_reward(r_acc > 0.5, lengths)  # correct: 60 -> 1, 95 -> 0
    r_over, _ = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=1.0)
    total = combine_rewards(r_acc, r_len, 0.1) + r_over
    assert_close(total, torch.tensor([[1.1, 1.0 - 0.75, 0.0 - 1.0]]))


def test_overlong_penalty_turns_an_all_correct_group_into_a_gradient_towards_the_short_answer():
    from agpo_megatron.algo.advantages import grpo_advantages
    from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss

    r_acc = torch.tensor([[1.0, 1.0]])
    lengths = torch.tensor([[50, 90]])  # the second is half-way down the ramp: -0.5
    r_over, _ = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=1.0)
    adv_plain, _ = grpo_advantages(r_acc)
    adv, _ = grpo_advantages(r_acc + r_over, eps=0.0)
    assert adv_plain.eq(0).all()
    # rewards [1, 0.5]: mean 0.75, unbiased std sqrt(0.125) -> A = +-0.25 / 0.35355 = +-1/sqrt(2)
    assert_close(adv, torch.tensor([[2**-0.5, -(2**-0.5)]]))
    lp = torch.zeros(2, 1, requires_grad=True)  # one token each, on-policy
    loss, _ = policy_loss(lp, None, adv[0], torch.ones(2, 1), PolicyLossConfig())
    (grad,) = torch.autograd.grad(loss, lp)
    assert_close(grad, torch.tensor([[-(2**-0.5) / 2], [2**-0.5 / 2]]))  # descent raises the short one
