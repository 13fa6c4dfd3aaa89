"""Rollout correction (issue 21 §3): hand-worked weights, metrics and gradients for tis / mis, per
token and per sequence, padded and packed; tis_cap keeps its meaning.

Mutations run by hand, each failing a test below: `raw > mis_high` -> `raw >= mis_high` (the
boundary weight 2.0 is kept, test_packed_sequences); the sequence level ignoring `seq_ids` (the two
packed responses share one weight, same test); the weight not detached (test_gradient...)."""

import math

import pytest
import torch

from agpo_megatron.algo.correction import correction_weights
from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


# One response of 3 tokens (a 4th is padding with garbage) whose weights old/rollout are 0.4, 1, 3.
OLD = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
ROLLOUT = -torch.log(torch.tensor([[0.4, 1.0, 3.0, 1.0]], dtype=torch.float64))
ROLLOUT[0, 3] = float("nan")  # padding garbage must not leak
MASK = torch.tensor([[True, True, True, False]])


def test_token_level_tis_and_mis_by_hand():
    w, m = correction_weights(OLD, ROLLOUT, MASK, "tis", tis_cap=2.0)
    close(w, [[0.4, 1.0, 2.0, 0.0]])
    close(m["rc_weight_mean"], (0.4 + 1 + 3) / 3)
    close(m["rc_weight_max"], 3.0)
    close(m["rc_masked_frac"], 0.0)
    w, m = correction_weights(OLD, ROLLOUT, MASK, "mis", mis_low=0.5, mis_high=2.0)
    close(w, [[0.0, 1.0, 0.0, 0.0]])
    close(m["rc_masked_frac"], 2 / 3)
    w, _ = correction_weights(OLD, ROLLOUT, MASK, "none")
    close(w, [[1.0, 1.0, 1.0, 0.0]])


def test_sequence_level_uses_the_geometric_mean():
    g = (0.4 * 1.0 * 3.0) ** (1 / 3)  # 1.0627
    w, m = correction_weights(OLD, ROLLOUT, MASK, "tis", level="sequence", tis_cap=1.05)
    close(w, [[1.05, 1.05, 1.05, 0.0]])
    close(m["rc_weight_mean"], g)
    close(m["rc_weight_max"], g)
    w, _ = correction_weights(OLD, ROLLOUT, MASK, "mis", level="sequence", mis_low=0.5, mis_high=2.0)
    close(w, [[g, g, g, 0.0]])  # every token kept: the response's weight is in range


def test_packed_sequences_are_kept_or_dropped_whole():
    # One packed row: response 1 (weights 4, 1 -> geometric mean 2), response 2 (0.25, 1 -> 0.5).
    old = torch.zeros(1, 4, dtype=torch.float64)
    rollout = -torch.log(torch.tensor([[4.0, 1.0, 0.25, 1.0]], dtype=torch.float64))
    mask = torch.ones(1, 4, dtype=torch.bool)
    seq_ids = torch.tensor([[1, 1, 2, 2]])
    w, m = correction_weights(old, rollout, mask, "mis", level="sequence", mis_low=0.5, mis_high=2.0, seq_ids=seq_ids)
    close(w, [[2.0, 2.0, 0.5, 0.5]])  # both on the (inclusive) bounds: kept
    close(m["rc_masked_frac"], 0.0)
    w, m = correction_weights(old, rollout, mask, "mis", level="sequence", mis_low=0.6, mis_high=1.9, seq_ids=seq_ids)
    close(w, [[0.0, 0.0, 0.0, 0.0]])
    close(m["rc_masked_frac"], 1.0)
    w, _ = correction_weights(old, rollout, mask, "mis", level="sequence", mis_low=0.4, mis_high=1.9, seq_ids=seq_ids)
    close(w, [[0.0, 0.0, 0.5, 0.5]])  # response 1 dropped whole, response 2 kept whole


def test_gradient_is_the_weighted_policy_gradient_and_flows_only_through_the_current_policy():
    # On-policy ratio 1 and A = 1: per-token pg = -w, token-mean over 3 tokens -> d loss / d logp = -w / 3.
    for mode, kw, w in [
        ("tis", {"tis_cap": 2.0}, [0.4, 1.0, 2.0, 0.0]),
        ("mis", {"mis_low": 0.5, "mis_high": 2.0}, [0.0, 1.0, 0.0, 0.0]),
    ]:
        logp = OLD.clone().requires_grad_(True)
        rollout = ROLLOUT.clone().requires_grad_(True)
        cfg = PolicyLossConfig(rollout_correction=mode, **kw)
        loss, metrics = policy_loss(logp, OLD, torch.ones(1, dtype=torch.float64), MASK, cfg, rollout_logprobs=rollout)
        loss.backward()
        close(loss, -sum(w) / 3)
        close(logp.grad, [[-x / 3 for x in w]])
        assert rollout.grad is None or not rollout.grad.any()  # the weight is detached
        assert "rc_weight_mean" in metrics and ("tis_weight_mean" in metrics) == (mode == "tis")


def test_tis_cap_keeps_its_meaning_and_the_config_is_validated():
    assert PolicyLossConfig(tis_cap=2.0).rollout_correction == "tis"
    plain = policy_loss(OLD, OLD, torch.ones(1), MASK, PolicyLossConfig(tis_cap=2.0), rollout_logprobs=ROLLOUT)
    named = policy_loss(
        OLD, OLD, torch.ones(1), MASK, PolicyLossConfig(rollout_correction="tis", tis_cap=2.0), rollout_logprobs=ROLLOUT
    )
    close(plain[0], named[0])
    close(plain[1]["tis_weight_mean"], (0.4 + 1 + 2) / 3)
    for kw, match in [
        ({"rollout_correction": "tis"}, "needs tis_cap"),
        ({"rollout_correction": "mis", "tis_cap": 2.0}, "belongs to rollout_correction='tis'"),
        ({"rollout_correction": "mis", "mis_low": 2.0, "mis_high": 1.0}, "0 <= low < high"),
        ({"rollout_correction": "is"}, "rollout_correction must be one of"),
        ({"correction_level": "batch"}, "correction_level must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            PolicyLossConfig(**kw)
    with pytest.raises(ValueError, match="rollout_correction='mis' needs rollout_logprobs"):
        policy_loss(OLD, OLD, torch.ones(1), MASK, PolicyLossConfig(rollout_correction="mis"))


def test_extreme_log_weights_stay_finite():
    rollout = torch.tensor([[-1e4, 1e4, 0.0, 0.0]], dtype=torch.float64)
    w, m = correction_weights(OLD, rollout, MASK, "tis", tis_cap=2.0)
    assert torch.isfinite(w).all() and math.isfinite(float(m["rc_weight_max"]))
