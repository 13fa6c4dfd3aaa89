"""The tiny Qwen3-MoE the MoE tests share: 2 layers, 4 experts of width 32, 2 heads of dim 32 (vLLM's
CPU minimum) over 1 KV head, so that EP=2 puts 2 experts on each of 2 gloo ranks."""

from pathlib import Path

from agpo_megatron.models.tiny import save_tiny_hf_model

TINY_MOE = dict(
    hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, num_layers=2, num_experts=4, moe_intermediate_size=32
)


VLLM_SYNC_MOE = dict(
    hidden_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    num_layers=2,
    vocab_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    init_std=0.1,
)
"""The vLLM sync checks' tiny Qwen3-MoE (tests/rollout/test_vllm_moe_sync.py and the GPU smoke suite's
MoE sections): 8 experts of width 64, top-2; init_std 0.1 so that two seeds' log-probs differ clearly."""


def save_tiny_moe(path: Path, **overrides) -> Path:
    """`save_tiny_hf_model(path, "qwen3_moe", ...)` at `TINY_MOE`, `overrides` on top."""
    return save_tiny_hf_model(path, "qwen3_moe", **{**TINY_MOE, **overrides})
