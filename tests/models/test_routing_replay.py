"""Routing replay (issue 23, `algo.routing_replay`): a training forward routes each token exactly as
recorded, the gradient reaches only the recorded experts, and the mismatch metric counts what free
routing would change. On 2 gloo ranks: at EP=2, then at PP=2 with packed micro-batches and the fused
loss through the Actor, r2 and r3 (a synthetic record in place of vLLM's)."""

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

    # Phase 2: PP=2 (stage r holds layer r), packed rows, the fused loss, via the Actor.
    for rank, res in enumerate(ranks):
        pp2 = res["pp2"]
        assert pp2["record_layers"] == [rank] and pp2["record_shape_ok"]  # each stage records its own layer
        if rank == 1:  # the last stage: where the log-probs are
            assert pp2["replay_same_logprobs"], "PP=2: replaying the natural record changed the log-probs"
        assert pp2["natural_mismatch"] == 0.0
        # r3: every token but each sequence's last (which vLLM never routes) follows the synthetic record
        assert pp2["r3_recorded_tokens"] == sum(n - 1 for n in (11, 7, 5, 9, 6, 4))
        assert pp2["r3_routed_as_recorded"] and pp2["r3_mismatch_reset"]
        # All 4 experts are local at EP=1: layer 0 uses {2, 3}, layer 1 {0, 1}; only those get gradient
        # (each stage names its one layer decoder.layers.0).
        used = {0: (2, 3), 1: (0, 1)}[rank]
        for e in range(4):
            for fc in ("linear_fc1", "linear_fc2"):
                g = pp2["grad_abs"][f"decoder.layers.0.mlp.experts.local_experts.{e}.{fc}.weight"]
                assert (g > 0) == (e in used), f"stage {rank} expert {e} {fc}: |grad| {g}"
    assert ranks[0]["pp2"]["update_mismatch"] == ranks[1]["pp2"]["update_mismatch"] > 0
    # r3's engine-vs-trainer metric: each log-prob pass's fraction (reduced over the stages), then
    # their mean with the next update. The first pass's record is the synthetic one.
    passes = ranks[0]["pp2"]["r3_logprob_pass_mismatch"]
    assert len(passes) == 1 and 0 < passes[0] <= 1 and ranks[1]["pp2"]["r3_logprob_pass_mismatch"] == passes
    for res in ranks:
        both = res["pp2"]["rollout_mismatch_passes"]
        assert len(both) == 2 and both[0] == passes[0] and res["pp2"]["rollout_mismatch_restarted"]
        assert res["pp2"]["rollout_mismatch"] == pytest.approx(sum(both) / 2) and 0 < sum(both) / 2 <= 1
    assert ranks[0]["pp2"]["rollout_mismatch"] == ranks[1]["pp2"]["rollout_mismatch"]
    assert ranks[0]["pp2"]["compare_mismatch"] == ranks[1]["pp2"]["compare_mismatch"] > 0
