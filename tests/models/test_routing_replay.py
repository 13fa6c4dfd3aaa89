"""Routing replay (issue 23, `algo.routing_replay`): a training forward routes each token exactly as
recorded, the gradient reaches only the recorded experts, and the mismatch metric counts what free
routing would change. On 2 gloo ranks at EP=2."""

import pytest
import torch

from tests.dist import torchrun
from tests.moe_models import save_tiny_moe


@pytest.mark.slow
def test_replay_routes_as_recorded_and_grads_only_recorded_experts(tmp_path):
    hf_dir = save_tiny_moe(tmp_path / "hf", num_experts_per_tok=2, init_std=0.1)
    torchrun("routing_replay.py", hf_dir, tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for rank, res in enumerate(ranks):
        assert res["record_shapes"] == {0: (2, 12, 2), 1: (2, 12, 2)}  # [B, S, top-k] per layer
        assert res["replay_same_logprobs"], "replaying the natural record changed the log-probs"
        assert res["natural_mismatch"] == 0.0
        assert res["routed_as_recorded"] == {0: True, 1: True}
        # Rank 0 holds experts 0-1, rank 1 experts 2-3. Layer 0 routes every token to {2, 3},
        # layer 1 to {0, 1}: exactly the recorded experts of this rank have a gradient.
        for layer, used_here in [(0, rank == 1), (1, rank == 0)]:
            for e in (0, 1):
                for fc in ("linear_fc1", "linear_fc2"):
                    g = res["grad_abs"][f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{fc}.weight"]
                    assert (g > 0) == used_here, f"rank {rank} layer {layer} local expert {e} {fc}: |grad| {g}"
    # Every rank sees the same reduced metrics; the free routing disagrees with the forced record.
    assert ranks[0]["replay_mismatch"] == ranks[1]["replay_mismatch"] > 0
    assert ranks[0]["compare_mismatch"] == pytest.approx(
        (ranks[0]["natural_vs_forced"] + ranks[1]["natural_vs_forced"]) / 2
    )
