"""Partial rollouts reach the trainer per token (rollout/partial.py, train/async_loop.py): ages counted
from each token's own version, and the loss's correction weighing each token by its own behaviour
log-prob (issue 21, section 4 (c))."""

import math

import pytest
import torch

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.data.datasets import Example
from agpo_megatron.rollout.base import Completion
from agpo_megatron.rollout.partial import Sample, splice
from agpo_megatron.train.async_loop import Group, token_ages
from agpo_megatron.train.batch import to_micro_batch
from agpo_megatron.train.sequences import Sequences

PROBS = {0: [0.5, 0.3, 0.2], 1: [0.1, 0.6, 0.3]}
"""p(token 0, 1, 2) under weight versions 0 and 1."""


def lp(version, tokens):
    return [math.log(PROBS[version][t]) for t in tokens]


def test_token_ages_count_every_token_from_its_own_version():
    ex = Example(prompt_ids=[5], prompt_text="", gold="", index=0)
    mixed = Completion(
        prompt_index=0,
        token_ids=[0, 1, 2, 0],
        logprobs=None,
        text="",
        finish_reason="length",
        weight_version=3,
        token_versions=[1, 1, 3, 3],
    )
    whole = Completion(prompt_index=0, token_ids=[1, 1], logprobs=None, text="", finish_reason="stop", weight_version=3)
    m = token_ages([Group(ex, [mixed, whole], 3)], version=4)
    # ages: 3, 3, 1, 1 and 1, 1 -> mean 10/6, max 3; two of six tokens were sampled before a pause
    assert m == {
        "token_age_mean": pytest.approx(10 / 6),
        "token_age_max": 3.0,
        "paused_token_frac": pytest.approx(2 / 6),
    }


def test_the_loss_weighs_each_token_by_its_own_behaviour_log_prob():
    """(c): a response spliced from a version-0 and a version-1 segment, trained by weights whose
    proximal log-probs are version 1's. TIS (cap 1.5) weighs token t by min(p1 / p_behaviour(t), 1.5)."""
    s = Sample([5], seed=0)
    s = splice(
        s, Completion(prompt_index=0, token_ids=[0, 1], logprobs=lp(0, [0, 1]), text="", finish_reason="length"), 0, 5
    )
    s = splice(
        s,
        Completion(prompt_index=0, token_ids=[2, 0, 1], logprobs=lp(1, [2, 0, 1]), text="", finish_reason="length"),
        1,
        5,
    )
    assert s.versions == [0, 0, 1, 1, 1]
    seqs = Sequences(
        tokens=[[5, *s.token_ids]], prompt_lens=[1], advantages=torch.tensor([1.0]), rollout_logprobs=[s.logprobs]
    )
    mb = to_micro_batch(seqs, 8, pad_id=9)
    mask = mb["loss_mask"].bool()  # positions 0..4 predict the 5 response tokens
    old = torch.zeros(1, 8)
    old[0, :5] = torch.tensor(lp(1, s.token_ids))
    logprobs = old.clone().requires_grad_(True)  # on the proximal weights: ratio 1, inside the clip
    cfg = PolicyLossConfig(rollout_correction="tis", tis_cap=1.5)
    loss, m = policy_loss(
        logprobs, old, mb["advantages"], mask, cfg, rollout_logprobs=mb["rollout_logprobs"], global_num_tokens=5
    )
    # raw weights p1/p_behaviour: token 0 (v0) 0.1/0.5 = 0.2, token 1 (v0) 0.6/0.3 = 2 (capped to 1.5),
    # tokens 2, 0, 1 (v1) exactly 1. Loss = -A * sum(w) / 5 = -(0.2 + 1.5 + 3) / 5 = -0.94.
    assert float(loss.detach()) == pytest.approx(-0.94, abs=1e-6)
    assert float(m["rc_weight_mean"]) == pytest.approx((0.2 + 2 + 3) / 5, abs=1e-6)
    assert float(m["rc_weight_max"]) == pytest.approx(2.0, abs=1e-6)
    loss.backward()
    assert logprobs.grad[0, :5].tolist() == pytest.approx([-0.04, -0.3, -0.2, -0.2, -0.2], abs=1e-6)
    assert logprobs.grad[0, 5:].abs().sum() == 0
