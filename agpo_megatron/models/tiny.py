"""Tiny random HF models, built offline with `transformers`, for tests, benchmarks and the CPU demo.

Head dim defaults to 32: vLLM's CPU attention kernel refuses head dims below 32.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_config(
    model_type: str = "qwen2",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int | None = None,
    tie: bool = False,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    torch_dtype: str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int | None = None,
    norm_topk_prob: bool = True,
    shared_expert_intermediate_size: int | None = None,
):
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        rope_theta=rope_theta,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if model_type == "qwen2":
        cfg = Qwen2Config(**common)
    elif model_type == "qwen3":
        cfg = Qwen3Config(head_dim=head_dim or hidden_size // num_heads, **common)
    elif model_type == "qwen3_moe":
        # Every layer sparse (decoder_sparse_step 1), as in the released Qwen3-MoE models.
        cfg = Qwen3MoeConfig(
            head_dim=head_dim or hidden_size // num_heads,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size or intermediate_size // 2,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    elif model_type == "qwen2_moe":
        # Every layer sparse, one shared expert with its gate (Qwen1.5-MoE-A2.7B's form).
        cfg = Qwen2MoeConfig(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=moe_intermediate_size or intermediate_size // 2,
            shared_expert_intermediate_size=shared_expert_intermediate_size or intermediate_size,
            norm_topk_prob=norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    elif model_type == "llama":
        cfg = LlamaConfig(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            **common,
        )
    else:
        raise ValueError(f"unknown tiny model_type {model_type!r}")
    cfg.torch_dtype = torch_dtype
    return cfg


def save_tiny_hf_model(
    out_dir: str | Path, model_type: str = "qwen2", *, seed: int = 0, tokenizer=None, init_std: float = 0.02, **kw
) -> Path:
    """Write a random HF CausalLM (safetensors + config.json [+ tokenizer]) to `out_dir`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    cfg = tiny_hf_config(model_type, **kw)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, cfg.torch_dtype))
    with torch.no_grad():  # random norms/biases too, so that a mis-mapped tensor cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    # NOTE: transformers 5 writes weights and config only on torch.distributed rank 0 when a process
    # group exists (`should_save_on_this_rank`). A `tiny:` model is built by whichever rank takes the
    # cache lock first (models/inputs.py); built on rank 1, the folder held only the tokenizer and was
    # renamed into the cache as if complete (both ranks then failed: "no config.json"). This model is
    # this process's own, so this process writes it.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
