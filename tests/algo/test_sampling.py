import pytest
import torch

from agpo_megatron.algo.advantages import grpo_advantages
from agpo_megatron.algo.sampling import group_unit, mixed_groups, trainable_groups


def test_mixed_groups_keep_only_groups_with_both_outcomes():
    r_acc = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert mixed_groups(r_acc).tolist() == [False, False, True, True]
    # A verifier's 0.9999999 still counts as equal to 1.
    assert mixed_groups(torch.tensor([[1.0, 0.9999999]])).tolist() == [False]


def test_dropped_groups_are_exactly_the_ones_with_zero_grpo_advantage():
    """What DAPO removes carries no GRPO signal, so filtering changes the batch, not the kept groups' advantages."""
    r_acc = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    keep = mixed_groups(r_acc)
    adv, _ = grpo_advantages(r_acc)
    assert adv[~keep].eq(0).all() and adv[keep].ne(0).all()
    # Groups are whole: the kept groups' advantages are the same computed alone.
    assert torch.equal(grpo_advantages(r_acc[keep])[0], adv[keep])


def test_group_unit_and_trainable_groups_by_hand():
    # dp 2, G 5, micro-batch 4: n % 2 == 0 and 5n/2 % 4 == 0 -> n = 8 (40 sequences, 20 per rank, 5 micro-batches).
    assert group_unit(dp=2, group_size=5, micro_batch_size=4) == 8
    assert group_unit(dp=1, group_size=8, micro_batch_size=4) == 1
    assert group_unit(dp=4, group_size=6, micro_batch_size=4) == 8
    assert trainable_groups(40, 32, 8) == 32  # enough: exactly the target
    assert trainable_groups(31, 32, 8) == 24  # short: whole units only
    assert trainable_groups(7, 32, 8) == 0
    with pytest.raises(ValueError, match="target"):
        trainable_groups(3, 0, 1)
    with pytest.raises(ValueError, match="G >= 2"):
        mixed_groups(torch.zeros(3, 1))
