"""Packing and data-parallel balancing: pure functions, hand-checked layouts, the loss over packed rows."""

import random

import pytest
import torch

from agpo_megatron.algo.loss import PolicyLossConfig, aggregate, policy_loss
from agpo_megatron.models.forward import packed_causal_mask
from agpo_megatron.train.batch import (
    Sequences,
    balance_dp,
    padding_stats,
    plan_micro_batches,
    split_micro_batches,
)
from agpo_megatron.train.packing import plan_packed, to_packed_micro_batch, unpack


def _seqs():
    # prompts of 3, 2, 4 tokens; responses of 2, 4, 1 tokens (lengths 5, 6, 5)
    return Sequences(
        tokens=[[1, 2, 3, 10, 11], [4, 5, 12, 13, 14, 15], [6, 7, 8, 9, 16]],
        prompt_lens=[3, 2, 4],
        advantages=torch.tensor([1.0, -1.0, 0.5]),
        rollout_logprobs=[[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3], [-0.5]],
    )


def test_packed_micro_batch_by_hand():
    # rows of 11 (multiple 1): the 6-token sequence, then a 5 beside it; the other 5 alone.
    plans = plan_packed([5, 6, 5], micro_batch_size=2, max_tokens=None, fixed_shape=False, pad_to_multiple=11)
    assert [p.rows for p in plans] == [[[1, 0], [2]]] and plans[0].shape == (2, 11)
    mb = to_packed_micro_batch(_seqs(), plans[0], pad_id=0)
    assert mb["tokens"][0].tolist() == [4, 5, 12, 13, 14, 15, 1, 2, 3, 10, 11]
    assert mb["targets"][0].tolist() == [5, 12, 13, 14, 15, 0, 2, 3, 10, 11, 0]  # no target across sequences
    assert mb["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert mb["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert mb["seq_ids"].tolist() == [[0] * 6 + [1] * 5, [2] * 5 + [-1] * 6]
    assert mb["seq_index"].tolist() == [1, 0, 2]
    assert mb["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]  # padding restarts too
    assert mb["cu_seqlens"].tolist() == [0, 6, 11, 16, 22] and mb["max_seqlen"] == 6
    assert mb["advantages"][0].tolist() == [-1.0] * 6 + [1.0] * 5
    assert mb["rollout_logprobs"][0, 1:5].tolist() == pytest.approx([-1.0, -1.1, -1.2, -1.3])
    assert mb["rollout_logprobs"][0, 8:10].tolist() == pytest.approx([-0.1, -0.2])
    assert [v.tolist() for v in unpack(mb, mb["tokens"])] == [_seqs().tokens[i] for i in (1, 0, 2)]
    assert mb["loss_mask"].sum() == _seqs().num_response_tokens()


def test_block_diagonal_causal_mask():
    mask = packed_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))  # True = masked
    allowed = (~mask[0, 0]).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def _ragged(n, seed=0, lo=10, hi=300):
    rng = random.Random(seed)
    return [min(hi, max(lo, int(rng.lognormvariate(4.3, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_tokens=None, fixed_shape=False),
        dict(max_tokens=1000, fixed_shape=False),
        dict(max_tokens=None, fixed_shape=True),
        dict(max_tokens=1000, fixed_shape=True),
    ],
)
def test_every_sequence_once_rows_fit_and_budget_holds(kw):
    lengths = _ragged(200)
    plans = plan_packed(lengths, micro_batch_size=4, pad_to_multiple=8, **kw)
    assert sorted(i for p in plans for row in p.rows for i in row) == list(range(200))
    row_len = -(-max(lengths) // 8) * 8
    budget = kw["max_tokens"] or 4 * row_len
    for p in plans:
        r, s = p.shape
        assert len(p.rows) <= r and s % 8 == 0 and s <= row_len and r * s <= budget
        assert all(sum(lengths[i] for i in row) <= s for row in p.rows)
    if kw["fixed_shape"]:
        assert {p.shape for p in plans} == {(budget // row_len, row_len)}
    real = sum(lengths)
    computed = sum(p.computed_tokens for p in plans)
    padded = sum(
        p.computed_tokens
        for p in plan_micro_batches(lengths, micro_batch_size=4, uniform_length=False, max_tokens=kw["max_tokens"])
    )
    assert computed < padded
    if not kw["fixed_shape"]:
        assert real / computed >= 0.9  # a long-tailed batch packs tightly


def test_packed_budget_below_one_sequence_is_an_error():
    with pytest.raises(ValueError, match="below one padded sequence"):
        plan_packed([5, 40], micro_batch_size=1, max_tokens=32, fixed_shape=False)


def test_balance_dp_equal_counts_balanced_tokens_deterministic():
    lengths = [1000] + [10] * 15  # a contiguous split gives rank 0 1070 tokens and rank 1 80
    ranks = balance_dp(lengths, 2)
    assert sorted(i for r in ranks for i in r) == list(range(16)) and [len(r) for r in ranks] == [8, 8]
    assert all(r == sorted(r) for r in ranks) and ranks == balance_dp(lengths, 2)
    lengths = _ragged(256, seed=3)
    for dp in (2, 4, 8):
        loads = [sum(lengths[i] for i in r) for r in balance_dp(lengths, dp)]
        assert max(loads) - min(loads) <= max(lengths), (dp, loads)
    with pytest.raises(ValueError, match="do not split evenly"):
        balance_dp([1, 2, 3], 2)


def test_padding_stats_over_all_ranks():
    lengths = _ragged(64, seed=1)
    ranks = balance_dp(lengths, 2)
    kw = dict(micro_batch_size=4, max_tokens=None, uniform_length=False, pad_to_multiple=8)
    packed, padded = (
        padding_stats(lengths, ranks, packing=True, **kw),
        padding_stats(lengths, ranks, packing=False, **kw),
    )
    assert packed["batch/real_tokens"] == padded["batch/real_tokens"] == sum(lengths)
    assert packed["batch/padding_efficiency"] > padded["batch/padding_efficiency"]
    seqs = Sequences(tokens=[[1] * n for n in lengths], prompt_lens=[1] * 64, advantages=torch.zeros(64))
    mbs = [mb for r in ranks for mb in split_micro_batches(seqs.select(r), pad_id=0, packing=True, **kw)]
    assert sum(mb["tokens"].numel() for mb in mbs) == packed["batch/computed_tokens"]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_over_packed_rows_equals_padded_rows(mode):
    """`seq_ids` finds the sequences of packed rows: same loss, same gradient as one sequence per row."""
    g = torch.Generator().manual_seed(0)
    seqs = Sequences(
        tokens=[[1] * n for n in (7, 3, 12, 5, 9)], prompt_lens=[2, 1, 4, 2, 3], advantages=torch.randn(5, generator=g)
    )
    pad = split_micro_batches(
        seqs, micro_batch_size=5, max_tokens=None, pad_id=0, uniform_length=False, pad_to_multiple=1
    )[0]
    packs = split_micro_batches(
        seqs, micro_batch_size=3, max_tokens=None, pad_id=0, uniform_length=False, pad_to_multiple=1, packing=True
    )
    assert len(packs) == 1 and packs[0]["tokens"].shape == (3, 12)  # rows [12], [9, 3], [7, 5]
    pack = packs[0]
    per_seq_lp = [torch.randn(len(t), generator=g) for t in seqs.tokens]
    cfg = PolicyLossConfig(agg_mode=mode, kl_coef=0.1, entropy_coef=0.01)

    def loss_of(mb, rows):  # rows[i] = (row, offset) of sequence i in mb's layout
        lp = torch.zeros(mb["tokens"].shape)
        leaf = [v.clone().requires_grad_(True) for v in per_seq_lp]
        for (r, o), v in zip(rows, leaf):
            lp = lp.index_put((torch.full((len(v),), r), torch.arange(o, o + len(v))), v)
        old, ref, ent = lp.detach() - 0.1, lp.detach() * 1.2, lp.detach().abs()
        loss, _ = policy_loss(
            lp,
            old,
            mb["advantages"],
            mb["loss_mask"],
            cfg,
            ref_logprobs=ref,
            entropy=ent,
            global_num_tokens=40,
            global_num_seqs=7,
            seq_ids=mb.get("seq_ids"),
        )
        loss.backward()
        return loss, [v.grad for v in leaf]

    pad_loss, pad_grads = loss_of(pad, [(i, 0) for i in range(5)])
    where = {}
    for k, i in enumerate(pack["seq_index"].tolist()):
        r, o = (pack["seq_ids"] == k).nonzero()[0].tolist()
        where[i] = (r, o)
    pack_loss, pack_grads = loss_of(pack, [where[i] for i in range(5)])
    torch.testing.assert_close(pack_loss, pad_loss)
    for a, b in zip(pack_grads, pad_grads):
        torch.testing.assert_close(a, b)


def test_aggregate_local_sequence_count_with_seq_ids():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    ids = torch.tensor([[0, 0, 1, -1]])
    # two sequences: means 1.5 and 3 -> 2.25
    assert aggregate(per_token, mask, "seq-mean-token-mean", seq_ids=ids).item() == pytest.approx(2.25)
    assert aggregate(per_token, mask, "seq-mean-token-sum", seq_ids=ids).item() == pytest.approx(3.0)


def test_packing_is_the_default_and_must_be_a_bool(tmp_path):
    from agpo_megatron.config.schema import BatchConfig
    from agpo_megatron.config.yaml_io import ConfigError

    assert BatchConfig().packing is True
    with pytest.raises((ConfigError, ValueError), match="batch.packing"):
        BatchConfig(packing="yes")
