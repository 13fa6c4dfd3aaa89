"""HF `config.json` -> one architecture record -> Megatron `TransformerConfig` + GPTModel kwargs.

Supported: Qwen2 / Qwen2.5 (`qwen2`: qkv bias, tied or untied embeddings), Llama-3.x (`llama`:
rope scaling "llama3"), Qwen3 (`qwen3`: qk-layernorm, explicit `head_dim` -> `kv_channels`), and
Qwen3-MoE (`qwen3_moe`: Qwen3 attention, every layer's MLP a softmax top-k mixture of SwiGLU
experts, no shared expert; `num_experts > 0` in the record) and Qwen2-MoE / Qwen1.5-MoE
(`qwen2_moe`: Qwen2 attention with qkv bias, the same routed experts plus one shared SwiGLU expert
scaled by sigmoid(`shared_expert_gate`)).
Anything else is refused with the list of what is supported; a half-mapped model is worse than none.

This module reads JSON only (no megatron import at module level) so configs can be validated
before anything heavy is imported or allocated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe", "qwen2_moe")
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelArch:
    """The architecture facts the Megatron build and the weight bridge both need."""

    model_type: str
    """HF `model_type`: one of SUPPORTED_MODEL_TYPES."""
    vocab_size: int
    """Rows of the embedding / lm_head in the HF checkpoint."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU inner width (HF `intermediate_size`)."""
    num_layers: int
    """Transformer blocks."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads (GQA groups)."""
    head_dim: int
    """Per-head width; Qwen3 sets it explicitly (`kv_channels` in Megatron)."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: dict[str, Any] | None
    """HF rope_scaling dict (Llama-3 'llama3' type) or None."""
    max_position_embeddings: int
    """Longest position the model was trained for."""
    qkv_bias: bool
    """Bias on q/k/v projections (Qwen2)."""
    qk_layernorm: bool
    """RMSNorm on q and k per head (Qwen3)."""
    tie_word_embeddings: bool
    """lm_head shares the embedding matrix."""
    torch_dtype: str
    """Checkpoint dtype ('bfloat16', 'float32', ...); exports keep it."""
    num_experts: int = 0
    """Routed experts per MoE layer (HF `num_experts`); 0 = a dense model."""
    moe_topk: int = 0
    """Experts each token is routed to (HF `num_experts_per_tok`)."""
    moe_ffn_hidden_size: int = 0
    """Each expert's SwiGLU inner width (HF `moe_intermediate_size`)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1 (HF `norm_topk_prob`)."""
    shared_expert_ffn_hidden_size: int = 0
    """The shared expert's SwiGLU inner width (HF `shared_expert_intermediate_size`, qwen2_moe), every
    token through it, its output scaled by sigmoid(`shared_expert_gate`); 0 = no shared expert."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_channels(self) -> int:
        return self.head_dim


def arch_from_hf_dict(cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("hidden_act",):
        if cfg.get(key, "silu") != "silu":
            raise UnsupportedModelError(f"{source}: {key}={cfg[key]!r}; only 'silu' (SwiGLU) is supported")
    # transformers 5 writes `num_local_experts` where the released Qwen3-MoE configs say `num_experts`.
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if num_experts and model_type not in MOE_MODEL_TYPES:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} with experts is not supported")
    if model_type in MOE_MODEL_TYPES:
        _check_all_layers_moe(cfg, source)
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise UnsupportedModelError(f"{source}: rope_scaling type {kind!r} is not supported; supported: ['llama3']")
        if kind == "default":
            rope_scaling = None
    # transformers 5 moved rope_theta into rope_parameters; accept both spellings.
    rope_params = cfg.get("rope_parameters") or {}
    if rope_scaling is None and rope_params.get("rope_type") == "llama3":
        rope_scaling = rope_params
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    if model_type in ("qwen2", "qwen2_moe") and cfg.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelArch(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        # Qwen2 always has qkv bias; Llama/Qwen3 expose `attention_bias` (False for released models).
        # Qwen2-MoE's `qkv_bias` (True in every released one).
        qkv_bias={"qwen2": True, "qwen2_moe": bool(cfg.get("qkv_bias", True))}.get(
            model_type, bool(cfg.get("attention_bias", False))
        ),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        num_experts=num_experts,
        moe_topk=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or 0) if num_experts else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if num_experts else False,
        shared_expert_ffn_hidden_size=int(cfg.get("shared_expert_intermediate_size") or 0) if num_experts else 0,
    )


def _check_all_layers_moe(cfg: dict[str, Any], source: str) -> None:
    """Every released Qwen3-MoE / Qwen2-MoE makes every layer sparse; a mix of dense and MoE layers is
    refused rather than half-mapped (it would need per-layer specs in the build and the bridge)."""
    kind = cfg["model_type"]
    if not cfg.get("num_experts") and not cfg.get("num_local_experts"):
        raise UnsupportedModelError(f"{source}: {kind} without num_experts")
    for key in ("num_experts_per_tok", "moe_intermediate_size"):
        if not cfg.get(key):
            raise UnsupportedModelError(f"{source}: {kind} needs {key} > 0")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(
            f"{source}: mlp_only_layers={cfg.get('mlp_only_layers')} / decoder_sparse_step="
            f"{cfg.get('decoder_sparse_step')}: only all-MoE layers "
            "(decoder_sparse_step 1, no mlp_only_layers) are supported"
        )


def read_arch(hf_dir: str | Path) -> ModelArch:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    return arch_from_hf_dict(data, str(path))


TOKENIZER_SUBDIR = "tokenizer"
"""A model folder's own tokenizer folder (`tokenizer_path`)."""


def tokenizer_path(hf_dir: str | Path) -> str:
    """Where a model's tokenizer is: the folder's `tokenizer/` sub-folder when it has one, else the folder.

    Why a folder of its own: transformers 5 picks the tokenizer class from config.json's `model_type`
    for some types (qwen2 among them: `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`), whatever
    tokenizer_config.json says, and vLLM 0.32 does the same; a custom `tokenizer.json` beside a
    qwen2 config.json is then silently read as a byte-level BPE (spaces vanish, words become
    letters). A folder without config.json is loaded as its own tokenizer_config.json says. The
    trainer, vLLM (`tokenizer=`), preflight and the evaluator all load through this path.
    """
    sub = Path(hf_dir) / TOKENIZER_SUBDIR
    return str(sub) if (sub / "tokenizer_config.json").is_file() else str(hf_dir)


def load_tokenizer(hf_dir: str | Path) -> Any:
    """The model's tokenizer, from `tokenizer_path(hf_dir)` (every loader in the package uses this)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(hf_dir))


def llama3_inv_freq(arch: ModelArch) -> torch.Tensor:  # [head_dim/2]
    """Exact HF 'llama3' RoPE frequencies.

    NOTE: Megatron's `rope_scaling` hard-codes low/high_freq_factor=1/4 and
    original_max_position_embeddings=8192 (right for Llama 3.1, wrong for others), so the model
    builder overwrites `inv_freq` with this.
    """
    rs = arch.rope_scaling or {}
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * torch.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()
