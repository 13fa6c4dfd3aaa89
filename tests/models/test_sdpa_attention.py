"""The local spec's SDPA core attention equals Megatron's unfused `DotProductAttention`."""

import pytest
import torch

from tests.dist import torchrun

CASES = ("causal_mask", "packed_mask", "no_mask_causal_type")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdpa")
    torchrun("sdpa_attention_parity.py", out)
    return {tp: torch.load(out / f"tp{tp}.pt") for tp in (1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_context_and_gradients_match_megatron(results, tp, case):
    ref, got = results[tp][case]["megatron"], results[tp][case]["sdpa"]
    assert got["out"].shape == ref["out"].shape  # [S, B, heads/TP * head_dim]
    for field in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[field], ref[field], atol=2e-6, rtol=1e-5, msg=f"tp{tp} {case} {field}")


@pytest.mark.slow
def test_masks_change_the_result(results):
    """The cases differ from each other, so the comparisons above do test the masks."""
    out = {case: results[1][case]["sdpa"]["out"] for case in CASES}
    assert not torch.allclose(out["causal_mask"], out["packed_mask"], atol=1e-3)
    torch.testing.assert_close(out["no_mask_causal_type"], out["causal_mask"])


@pytest.mark.slow
def test_attention_dropout_while_training_stays_megatrons(results):
    assert results[1]["dropout_training_used_sdpa"] is False
    assert results[2]["dropout_training_used_sdpa"] is False
