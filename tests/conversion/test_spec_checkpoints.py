"""D6: a checkpoint loads under either layer spec. TE's `_extra_state` entries (FP8 metadata)
may be missing or extra; a missing or extra real weight is still an error."""

import json

import pytest

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun


@pytest.mark.slow
def test_checkpoints_load_across_local_and_te_like_specs(tmp_path):
    # Qwen3: its q/k norms are TENorms in the TE spec, with extra state of their own.
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen3", hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, num_layers=2, vocab_size=128
    )
    torchrun("extra_state_specs.py", hf_dir, tmp_path, nproc=1, timeout=240)
    res = json.loads((tmp_path / "result.json").read_text())
    # The emulation adds TE's keys that the local spec lacks, so the cross-spec loads mean something.
    assert "decoder.final_layernorm._extra_state" in res["te_only_extra_state"]
    assert "decoder.layers.self_attention.q_layernorm._extra_state" in res["te_only_extra_state"]
    assert res["local_to_te"] == res["te_to_local"] == "ok"
    assert res["te_to_te_extra_state_restored"] > 0
    errors = res["errors"]
    assert errors["checkpoint_lacks_weight"] and "output_layer.weight" in errors["checkpoint_lacks_weight"]
    assert errors["checkpoint_has_extra_weight"] and "output_layer.weight" in errors["checkpoint_has_extra_weight"]
