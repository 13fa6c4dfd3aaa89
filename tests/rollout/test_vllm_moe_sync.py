"""Megatron at EP=2 -> colocated vLLM (rollout TP=2) weight sync for a Qwen3-MoE (issue 23), on 2 CPU
ranks: each Megatron rank holds half the experts; the sync gathers them over EP and streams every
HF tensor in 64 KiB buckets into vLLM's fused-expert layout. vLLM starts from checkpoint A and
Megatron loads B, so agreement can only come from the sync. Thresholds are the dense test's
(tests/rollout/test_vllm_sync.py)."""

from pathlib import Path

import pytest
import torch

from agpo_megatron.data.synthetic import build_tokenizer
from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun
from tests.moe_models import VLLM_SYNC_MOE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("vllm_moe_sync")
    tok = build_tokenizer(root / "tok")
    kw = dict(VLLM_SYNC_MOE, eos_token_id=tok.eos_token_id, tokenizer=tok)
    vllm_dir = save_tiny_hf_model(root / "A", "qwen3_moe", seed=0, **kw)
    meg_dir = save_tiny_hf_model(root / "B", "qwen3_moe", seed=1, **kw)
    out = root / "out"
    out.mkdir()
    torchrun("rollout_sync.py", vllm_dir, meg_dir, out, 2, "ep2", "auto", "rollout", timeout=420)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], meg_dir


def _tokens(rows):
    return [r["token_ids"] for r in rows]


@pytest.mark.parametrize("phase", ["ep2/synced", "ep2/perturbed"])
def test_vllm_matches_megatron_after_moe_sync(run, phase):
    ranks, _ = run
    rec = ranks[0][phase]
    assert _tokens(rec["vllm_greedy"]) == rec["ref_greedy"]
    for rows, key in [(rec["vllm_greedy"], "ref_greedy_logprobs"), (rec["vllm_sampled"], "ref_sampled_logprobs")]:
        ref = rec[key]
        assert len(ref) == len(rows)
        for row, ref_lp in zip(rows, ref, strict=True):
            assert len(row["logprobs"]) == len(row["token_ids"]) == len(ref_lp)
            torch.testing.assert_close(torch.tensor(row["logprobs"]), torch.tensor(ref_lp), atol=1e-4, rtol=0)


def test_moe_sync_is_what_makes_vllm_agree(run):
    from safetensors.torch import load_file

    ranks, meg_dir = run
    rec = ranks[0]
    synced = _tokens(rec["ep2/synced"]["vllm_greedy"])
    assert _tokens(rec["pre_sync"]) != synced
    assert _tokens(rec["ep2/perturbed"]["vllm_greedy"]) != synced
    checkpoint = load_file(meg_dir / "model.safetensors")
    stats = rec["ep2/synced"]["stats"]
    # embed, norm, head + per layer: 8 attention/norm tensors, the router, 8 experts x 3.
    assert stats["tensors"] == len(checkpoint) == 3 + 2 * (8 + 1 + 8 * 3)
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in checkpoint.values())
    assert stats["buckets"] > 1
