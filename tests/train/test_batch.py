"""Completions -> micro-batches: masks line up with the response tokens; token budgets hold."""

import pytest
import torch

from agpo_megatron.train.batch import Sequences, split_micro_batches, to_micro_batch


def _seqs():
    # prompts of 3, 2, 4 tokens; responses of 2, 4, 1 tokens
    return Sequences(
        tokens=[[1, 2, 3, 10, 11], [4, 5, 12, 13, 14, 15], [6, 7, 8, 9, 16]],
        prompt_lens=[3, 2, 4],
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        rollout_logprobs=[[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3], [-0.5]],
    )


def test_mask_targets_and_rollout_logprobs_align():
    mb = to_micro_batch(_seqs(), seq_len=8, pad_id=0)
    assert mb["tokens"].shape == (3, 8)
    # row 0: positions 2, 3 predict tokens 10, 11
    assert mb["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert mb["targets"][0, 2:4].tolist() == [10, 11]
    assert mb["loss_mask"][1].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert mb["targets"][1, 1:5].tolist() == [12, 13, 14, 15]
    assert mb["loss_mask"][2].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert mb["rollout_logprobs"][1, 1:5].tolist() == pytest.approx([-1.0, -1.1, -1.2, -1.3])
    assert (mb["rollout_logprobs"] * (1 - mb["loss_mask"])).abs().sum() == 0
    assert mb["loss_mask"].sum() == _seqs().num_response_tokens() == 7


def test_split_by_count_and_by_token_budget():
    seqs = _seqs()
    by_count = split_micro_batches(
        seqs, micro_batch_size=2, max_tokens=None, pad_id=0, uniform_length=True, pad_to_multiple=1
    )
    assert [m["tokens"].shape for m in by_count] == [(2, 6), (1, 6)]
    # Dynamic: sorted by length, each micro-batch's padded tokens <= 11.
    dyn = split_micro_batches(
        seqs, micro_batch_size=99, max_tokens=11, pad_id=0, uniform_length=False, pad_to_multiple=1
    )
    assert all(m["tokens"].numel() <= 11 for m in dyn)
    assert sum(m["loss_mask"].sum().item() for m in dyn) == 7
    assert sorted(a for m in dyn for a in m["advantages"].tolist()) == [-1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="below one padded sequence"):
        split_micro_batches(seqs, micro_batch_size=1, max_tokens=4, pad_id=0, uniform_length=False, pad_to_multiple=1)


def test_pad_multiple_follows_the_layout():
    """D5: sequence parallelism splits the sequence over TP ranks, and FP8 GEMMs need 16-row shards."""
    from agpo_megatron.train.batch import pad_multiple

    assert pad_multiple(tp=4, sequence_parallel=False, fp8=False) == 8
    assert pad_multiple(tp=4, sequence_parallel=True, fp8=False) == 32
    assert pad_multiple(tp=1, sequence_parallel=False, fp8=True) == 16
    assert pad_multiple(tp=2, sequence_parallel=True, fp8=True) == 32
    seqs = Sequences(tokens=[[1] * n for n in (5, 17, 40)], prompt_lens=[2, 2, 2], advantages=torch.zeros(3))
    for mult in (32, 48):  # every micro-batch, by count or by token budget, is a multiple of it
        for kw in (dict(max_tokens=None, uniform_length=True), dict(max_tokens=200, uniform_length=False)):
            mbs = split_micro_batches(seqs, micro_batch_size=1, pad_id=0, pad_to_multiple=mult, **kw)
            assert all(mb["tokens"].shape[1] % mult == 0 for mb in mbs), (mult, kw)


def test_expert_parallel_ranks_get_one_shape():
    """With EP every rank must run the same forwards of one shape. 4 rows of 3, 4, 17, 18 tokens, one
    micro-batch per row, 2 ranks with one long and one short row each: by default each micro-batch is
    padded to its own row (8 or 24, multiples of 8); with the same shape, all to the mini-batch's
    longest, 18 -> 24."""
    from agpo_megatron.train.batch import split_mini_batches

    seqs = Sequences(tokens=[[1] * n for n in (3, 4, 17, 18)], prompt_lens=[1] * 4, advantages=torch.zeros(4))
    kw = dict(seqs_per_update=4, dp=2, pad_id=0, micro_batch_size=1, max_tokens=None, uniform_length=False)
    shapes = {
        same: [
            [
                tuple(mb["tokens"].shape)
                for mb in split_mini_batches(seqs, dp_rank=r, same_shape_across_dp=same, **kw)[0].micro_batches
            ]
            for r in (0, 1)
        ]
        for same in (False, True)
    }
    assert shapes[True] == [[(1, 24), (1, 24)], [(1, 24), (1, 24)]]
    assert [sorted(r) for r in shapes[False]] == [[(1, 8), (1, 24)], [(1, 8), (1, 24)]]
