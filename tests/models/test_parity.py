"""Megatron log-probs / entropy are layout-independent (TP=2, PP=2 == TP=1), the same with either
local core attention (SDPA, Megatron's), and equal HF's."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_logprobs_entropy_tp2_pp2_match_tp1_and_hf(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    hf_dir = save_tiny_hf_model(
        tmp_path / "hf",
        model_type,
        hidden_size=64,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        num_layers=2,
        vocab_size=128,
    )
    torchrun("model_parity.py", hf_dir, tmp_path)
    res = {k: torch.load(tmp_path / f"{k}.pt") for k in ("tp1", "tp2", "pp2", "tp1_megatron_attention")}
    for k in ("tp2", "pp2", "tp1_megatron_attention"):
        for field in ("logprobs", "entropy"):
            torch.testing.assert_close(res[k][field], res["tp1"][field], atol=1e-5, rtol=0, msg=f"{k} {field}")

    # The same tokens through transformers (the worker's generator and temperature).
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4, 24), generator=g)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens).logits / 0.7, dim=-1)
    targets = torch.roll(tokens, -1, dims=1)
    ref_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(res["tp1"]["logprobs"], ref_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(res["tp1"]["entropy"], ref_ent, atol=1e-4, rtol=0)
