"""Generated models a config can name instead of a path.

    model.hf_path: tiny:qwen2        # the CPU demo's tiny model + word-level tokenizer (in model/tokenizer/)
    model.hf_path: tiny:qwen3_moe    # the same shape as a Qwen3-MoE: 8 experts of width 96, top-2

`resolve_model(spec)` builds the model once into the cache of `data/inputs.py` (same rank-safe
rename, same lock) and returns its directory; any other value is returned unchanged.
"""

from __future__ import annotations

from pathlib import Path

from agpo_megatron.data.inputs import cache_key, materialize

TINY_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe")


def write_tiny_model(out: Path, model_type: str = "qwen2", *, seed: int = 0) -> Path:
    """The demo's tiny model (4 layers, hidden 128, head dim 32) with the demo's word-level tokenizer
    in its own folder, `out/tokenizer/` (`models.hf_config.tokenizer_path` says why)."""
    from agpo_megatron.data import synthetic
    from agpo_megatron.models.hf_config import TOKENIZER_SUBDIR
    from agpo_megatron.models.tiny import save_tiny_hf_model

    tok = synthetic.build_tokenizer(Path(out) / TOKENIZER_SUBDIR)
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96) if model_type == "qwen3_moe" else {}
    return save_tiny_hf_model(
        out,
        model_type,
        seed=seed,
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **moe,
    )


def resolve_model(spec: str, field: str = "model.hf_path") -> str:
    """`tiny:<model_type>` -> a cached HF directory; any other value is returned unchanged."""
    if not spec.startswith("tiny:"):
        return spec
    model_type = spec.removeprefix("tiny:")
    if model_type not in TINY_TYPES:
        raise ValueError(f"{field}: {spec!r}: unknown tiny model type (one of {list(TINY_TYPES)})")
    return str(materialize(f"tiny-{model_type}-{cache_key(model_type)}", lambda d: write_tiny_model(d, model_type)))
