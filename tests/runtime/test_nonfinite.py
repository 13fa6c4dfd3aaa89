"""No NaN reaches the weights (issue 11): skipped steps agree across ranks, persistent NaN stops the run."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from agpo_megatron.runtime.nonfinite import BadStepCounter, NonFiniteError, check_finite_weights, step_is_finite
from tests.dist import torchrun


def test_step_is_finite_looks_at_metrics_and_main_grads():
    p = torch.nn.Parameter(torch.ones(3))
    p.main_grad = torch.zeros(3)
    assert step_is_finite([p], [{"loss": torch.tensor(1.0), "n": 3}])
    assert not step_is_finite([p], [{"loss": torch.tensor(float("nan"))}])
    assert not step_is_finite([p], [{"loss": float("inf")}])
    p.main_grad[1] = float("nan")
    assert not step_is_finite([p], [{"loss": torch.tensor(1.0)}])


def test_bad_step_counter_stops_after_max_consecutive():
    c = BadStepCounter(max_bad_steps=2)
    for finite in (False, False, True, False, False):  # a good step resets the streak
        c.record(finite)
    assert c.total == 4
    with pytest.raises(NonFiniteError, match="3 consecutive steps.*max_bad_steps=2"):
        c.record(False)


def test_non_finite_weights_are_refused_by_name():
    check_finite_weights([("a", torch.ones(2))], "x")
    with pytest.raises(NonFiniteError, match=r"before saving ckpt/step_000002 \(first on this rank: b\)"):
        check_finite_weights(
            [("a", torch.ones(2)), ("b", torch.tensor([0.0, float("nan")]))], "saving ckpt/step_000002"
        )


@pytest.mark.slow
def test_nan_in_one_ranks_micro_batch_skips_the_step_everywhere(tmp_path):
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=128
    )
    out = torchrun("nonfinite_step.py", hf_dir, timeout=240)
    res: dict[int, dict[str, str]] = {0: {}, 1: {}}
    for line in out.splitlines():
        if line.startswith("RESULT"):
            _, rank, *kvs = line.split()
            res[int(rank)].update(kv.split("=", 1) for kv in kvs)
    for rank in (0, 1):
        r = res[rank]
        assert r["good_skipped"] == "0.0" and r["moved"] == "1", r
        assert r["bad_skipped"] == "1.0" and r["nonfinite"] == "1.0", r  # rank 1's own batch was finite
        assert r["unchanged"] == "1" and r["sched_same"] == "1", r
        assert r["second_bad"] == "stopped" and r["stop_msg"] == "True", r
        assert r["weights"] == "refused" and r["refuse_msg"] == "True", r  # only rank 1 holds the Inf; both refuse
