"""Actor.policy_step under the collective-device rule (issue 8 D1), and the rule's helper."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from agpo_megatron.runtime.parallel import comm_device, init_distributed
from tests.dist import torchrun
from tests.strict_collectives import CollectiveDeviceError, strict_collectives


def test_comm_device_is_cpu_on_gloo():
    init_distributed()  # a world of one on gloo here
    assert comm_device() == torch.device("cpu")


def test_guard_rejects_a_tensor_made_without_a_device():
    """The guard has teeth: the pre-fix pattern (a factory call with no device, then all_reduce) fails."""
    import torch.distributed as dist

    init_distributed()

    # The guard only polices package code: run both patterns with a package module name.
    g = {"__name__": "agpo_megatron.fake", "torch": torch, "dist": dist, "comm_device": comm_device}
    with strict_collectives() as checked:
        # what policy.reduce_token_weighted did before the fix
        with pytest.raises(CollectiveDeviceError, match="explicit device"):
            exec("vec = torch.zeros(3, dtype=torch.float64)\ndist.all_reduce(vec)", g)
        exec("vec = torch.zeros(3, dtype=torch.float64, device=comm_device())\ndist.all_reduce(vec)", g)
    assert checked == [("all_reduce", "agpo_megatron.fake")]


@pytest.mark.slow
@pytest.mark.parametrize("tp,loss", [(2, "fused"), (1, "plain")])
def test_policy_step_hands_collectives_only_comm_device_tensors(tmp_path, tp, loss):
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=2, num_layers=2, vocab_size=128
    )
    out = torchrun("strict_policy_step.py", hf_dir, tp, loss, timeout=240)
    line = next(l for l in out.splitlines() if l.startswith("CHECKED"))
    assert "all_reduce" in line and int(line.split()[1]) > 0, line


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["fused", "plain"])
def test_ppo_minibatches_shortcut_is_bit_exact_and_later_updates_are_off_policy(tmp_path, loss):
    """Issue 10: one update per rollout skips the actor's log-prob pass with the same gradient bit for
    bit; with several updates per rollout the clip acts and approx_kl > 0 from the second one on."""
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=2, num_layers=2, vocab_size=128
    )
    out = torchrun("ppo_updates.py", hf_dir, loss, timeout=300)
    assert sorted(l.split()[1] for l in out.splitlines() if l.startswith("RESULT") and " ok " in l) == ["0", "1"], out


def test_metric_reduction_weights_means_by_tokens_and_takes_true_extremes():
    """`*_max` is the largest value any micro-batch saw and `*_min` the smallest; the rest is the
    token-weighted mean. (Before: the maxima were averaged too, 0.75 * 3 + 0.25 * 9 = 4.5 here.)"""
    import math

    from agpo_megatron.runtime.parallel import Layout
    from agpo_megatron.train.policy import reduce_token_weighted

    init_distributed()  # a world of one on gloo
    layout = Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    per_mb = [
        {"num_tokens": 6.0, "pg_loss": torch.tensor(1.0), "ratio_max": 3.0, "ratio_min": 0.5},
        {"num_tokens": 2.0, "pg_loss": 3.0, "ratio_max": 9.0, "ratio_min": 0.8, "only_here_max": 2.0},
    ]
    out = reduce_token_weighted(per_mb, layout)
    assert out == {"only_here_max": 2.0, "pg_loss": 1.5, "ratio_max": 9.0, "ratio_min": 0.5}
    # A rank that holds no loss metrics (not the last stage) contributes nothing, not a made-up extreme.
    off = Layout(rank=0, world_size=1, tp=1, pp=2, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    out = reduce_token_weighted(per_mb, off)
    assert out["pg_loss"] == 0.0 and math.isnan(out["ratio_max"]) and math.isnan(out["ratio_min"])
