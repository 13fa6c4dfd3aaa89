"""Packed micro-batches give what padded ones give: log-probs, entropy, loss, gradients (TP=1, TP=2, PP=2).

Local spec, fp32, on CPU (tests/workers/packing_parity.py). The THD path of the Transformer Engine
spec needs a GPU: tests/gpu/checks_te.py::packed_thd_matches_padded.
"""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun

LAYOUTS = ("tp1", "tp2", "pp2")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    hf_dir = save_tiny_hf_model(
        tmp / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32, num_layers=2, vocab_size=128
    )
    torchrun("packing_parity.py", hf_dir, tmp, timeout=600)
    return {(lay, r): torch.load(tmp / f"{lay}_rank{r}.pt") for lay in LAYOUTS for r in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logprobs_and_entropy_of_every_sequence_match_padded(results, layout):
    last = [r for r in (0, 1) if "logprobs_pad" in results[layout, r]]
    assert last, "no rank of the last stage wrote log-probs"
    for r in last:
        res = results[layout, r]
        for key in ("logprobs", "entropy"):
            assert len(res[f"{key}_pack"]) == 12 and all(v is not None for v in res[f"{key}_pack"])
            for i, (a, b) in enumerate(zip(res[f"{key}_pack"], res[f"{key}_pad"])):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{layout} rank {r} {key} seq {i}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_loss_and_gradients_match_padded(results, layout, loss):
    for r in (0, 1):
        res = results[layout, r]
        if res[f"loss_{loss}_pad"] is not None:  # the last stage
            assert res[f"loss_{loss}_pack"] == pytest.approx(res[f"loss_{loss}_pad"], rel=1e-5)
        pad, pack = res[f"grads_{loss}_pad"], res[f"grads_{loss}_pack"]
        assert pad.keys() == pack.keys()
        assert max(g.abs().max().item() for g in pad.values()) > 1e-3  # a real gradient reached this stage
        for name in pad:
            torch.testing.assert_close(pack[name], pad[name], atol=1e-6, rtol=1e-4, msg=f"{layout} rank {r} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packing_computes_fewer_tokens(results, layout):
    tokens = results[layout, 0]["computed_tokens"]
    assert tokens["pack"] < 0.7 * tokens["pad"]
    if layout == "pp2":  # one shape for the pipeline: rows of the longest sequence, empty rows fill up
        assert len(set(results[layout, 0]["shapes_pack"])) == 1


@pytest.mark.slow
def test_what_parity_relies_on(results):
    """Without the block-diagonal mask sequences see each other; RoPE at row offsets is only rounding-close."""
    res = results["tp1", 0]
    err = {
        k: max((a - b).abs().max().item() for a, b in zip(res[k], res["logprobs_pad"]))
        for k in ("logprobs_pack", "logprobs_causal_only", "logprobs_row_positions")
    }
    assert err["logprobs_causal_only"] > 1e-2, err
    assert err["logprobs_pack"] <= err["logprobs_row_positions"], err
