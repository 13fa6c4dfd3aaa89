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


def test_each_check_syncs_once_however_many_tensors(monkeypatch):
    """Issue 18 item 6: a `bool(torch.isfinite(g).all())` per parameter is a device->host sync each
    (hundreds per optimizer step on a GPU). CPU has no sync to count, so every Tensor->Python
    conversion (`.item()`, `bool()`, `float()`, `int()`) is counted: one per check, 200 tensors or 2."""
    import agpo_megatron.runtime.nonfinite as nf

    conversions = []
    for name in ("item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _n=name: conversions.append(_n) or _real(t))
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(200)]
    for p in params:
        p.main_grad = torch.zeros(3)
    metrics = [{"loss": torch.tensor(1.0), "n": 3.0} for _ in range(4)]
    for p_list in (params[:2], params):
        conversions.clear()
        assert nf.step_is_finite(p_list, metrics)
        assert len(conversions) == 1, conversions
        conversions.clear()
        nf.check_finite_weights([(str(i), p) for i, p in enumerate(p_list)], "x")
        assert len(conversions) == 1, conversions
    params[150].main_grad[2] = float("inf")
    conversions.clear()
    assert not nf.step_is_finite(params, metrics) and len(conversions) == 1
    params[7].data[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"first on this rank: 7\)"):
        nf.check_finite_weights([(str(i), p) for i, p in enumerate(params)], "x")
    assert nf.step_is_finite([], [{"loss": 1.0}]) and not nf.step_is_finite([], [{"loss": float("nan")}])
    assert nf.step_is_finite([], [{"tokens": torch.tensor(7), "mask": torch.ones(2, dtype=torch.bool)}])
