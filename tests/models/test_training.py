"""Megatron DDP at DP=2 gives the DP=1 gradient of the policy loss; the distributed optimizer trains."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun


@pytest.mark.slow
def test_dp2_gradient_equals_dp1_and_optimizer_step_decreases_loss(tmp_path):
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=128
    )
    torchrun("dp_grad_and_step.py", hf_dir, tmp_path)

    res = torch.load(tmp_path / "dp_grad.pt")
    assert res["ref_loss"].abs() > 0  # a zero loss would make the comparison vacuous
    assert set(res["ref"]) == set(res["dp"])
    for name, ref in res["ref"].items():
        assert ref.abs().max() > 0, f"{name}: reference gradient is all zero"
        torch.testing.assert_close(res["dp"][name], ref, atol=1e-6, rtol=1e-4, msg=name)

    losses = torch.load(tmp_path / "opt_losses.pt")["losses"]
    assert losses[-1] < losses[0] - 1e-3, losses
