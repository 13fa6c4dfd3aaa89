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


@pytest.mark.slow
def test_padded_causal_runs_sdpa_without_a_mask_packed_keeps_its_mask(results):
    """Issue 18 item 5: CUDA's flash kernel rejects any explicit attn_mask, and the local spec passed
    one on every forward. Each SDPA call's (attn_mask is None, is_causal): the padded path's causal
    mask, also after activation recompute's detach, goes mask-free; packed rows keep their mask (and
    the parity tests above hold for both)."""
    for tp in (1, 2):
        r = results[tp]
        assert r["causal_mask"]["sdpa_calls"] == [(True, True)]
        assert r["recompute_sdpa_calls"] == [(True, True)]
        assert r["packed_mask"]["sdpa_calls"] == [(False, False)]
        assert r["no_mask_causal_type"]["sdpa_calls"] == [(True, True)]


def test_causal_mark_survives_detach_and_nothing_else():
    from torch.utils.checkpoint import detach_variable

    from agpo_megatron.models.forward import CausalMask, causal_mask

    m = causal_mask(4, torch.device("cpu"))
    assert isinstance(m, CausalMask) and m.dtype == torch.bool and m.shape == (1, 1, 4, 4)
    assert torch.equal(m.as_subclass(torch.Tensor), torch.ones(4, 4, dtype=torch.bool).triu(1)[None, None])
    assert isinstance(m.detach(), CausalMask) and isinstance(detach_variable((m,))[0], CausalMask)
    scores = torch.zeros(1, 1, 4, 4).masked_fill_(m, -10000.0)  # Megatron's attention_mask_func
    assert type(scores) is torch.Tensor and type(~m) is torch.Tensor and scores[0, 0, 0, 1] == -10000.0


@pytest.mark.slow
def test_recomputed_layers_run_sdpa_without_a_mask_too():
    """The presets recompute activations: the recomputed forward must take the mask-free path as well."""
    out = torchrun("sdpa_recompute.py", nproc=1, timeout=180)
    calls = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    assert calls == ["True,True"] * 4, calls  # 2 layers, forward and recompute
