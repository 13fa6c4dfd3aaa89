"""The model and parallel-layout sections of the training config: `model.*`, `parallel.*`, `offload.*`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from agpo_megatron.config.validate import require as _require


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    hf_path: str = ""
    """HF model directory (config.json, tokenizer, optionally safetensors weights), or `tiny:<qwen2|qwen3|llama>`
    for the CPU demo's tiny model, generated on first use (agpo_megatron/models/inputs.py)."""
    init_from: Literal["hf", "random", "megatron"] = "hf"
    """Where actor weights come from: the HF safetensors in `hf_path`, random init, or a
    Megatron dist checkpoint (`checkpoint.load_dir`)."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: Transformer Engine ('te', GPU only), Megatron-local ('local'), or
    'auto' = TE when CUDA and TE are present, else local."""
    local_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local spec: torch's `scaled_dot_product_attention` (one fused kernel,
    models/sdpa_attention.py) or Megatron's unfused `DotProductAttention` (baddbmm, masked softmax,
    bmm), the reference it is tested against. The TE spec ignores it."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter / compute dtype (Megatron keeps fp32 main params in the optimizer for 16-bit)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format through Transformer Engine (Hopper+); requires spec te. 'hybrid' = E4M3 forward,
    E5M2 gradients."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (Megatron's `fp8_recipe`); mxfp8 needs Blackwell."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history window (Megatron-Bridge's FP8 preset: 1024; Megatron: 1)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: scale from the window's max amax or the latest (Megatron-Bridge: max)."""
    fp8_margin: int = 0
    """Delayed scaling: scale margin, in powers of 2."""
    max_seq_len: int = 4096
    """Longest prompt+response the trainer will ever feed (sets RoPE cache and checks)."""
    recompute_activations: bool = False
    """Full activation recomputation per layer (saves memory at ~30% more compute)."""
    moe_aux_loss_coef: float = 0.001
    """MoE models only: weight of the router's load-balancing loss (Switch-style aux loss, Megatron's
    `moe_aux_loss_coeff`; 0.001 is Qwen3-MoE's `router_aux_loss_coef`). The loss is averaged over
    micro-batches and data-parallel ranks and logged as `train/moe_aux_loss`; 0 = off."""

    def __post_init__(self) -> None:
        _require(self.moe_aux_loss_coef >= 0, f"model.moe_aux_loss_coef must be >= 0, got {self.moe_aux_loss_coef}")
        _require(
            self.fp8_amax_history_len >= 1, f"model.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}"
        )
        _require(self.fp8_margin >= 0, f"model.fp8_margin must be >= 0, got {self.fp8_margin}")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (Megatron)."""
    pp: int = 1
    """Pipeline-parallel size (Megatron); the trainer uses 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    ep: int = 1
    """Expert-parallel size (MoE models): each rank of an expert-parallel group holds
    num_experts / ep experts; must divide the expert count, and etp x ep x pp must divide the world."""
    etp: int = 1
    """Expert tensor-parallel size (MoE models): each expert's weights split over this many ranks
    (Megatron's `expert_tensor_parallel_size`, independent of `tp`)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    seed: int = 1234
    """Base seed; Megatron derives per-TP-rank seeds, rollout derives per-replica seeds."""
    timeout_s: float = 3600.0
    """Process-group timeout for any one collective, sized for the slowest legitimate one (loading
    a 72B checkpoint, the first vLLM build)."""
    step_timeout_s: float = 1800.0
    """A rank that finishes no training step for this long exits (code 124), naming its phase, and once
    steps run every collective is bounded by it too: a hung or stopped peer fails the job instead of
    blocking it for `timeout_s`. 0 = off."""

    def __post_init__(self) -> None:
        _require(self.tp >= 1, f"parallel.tp must be >= 1, got {self.tp}")
        _require(self.pp >= 1, f"parallel.pp must be >= 1, got {self.pp}")
        _require(self.ep >= 1, f"parallel.ep must be >= 1, got {self.ep}")
        _require(self.etp >= 1, f"parallel.etp must be >= 1, got {self.etp}")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
        _require(self.timeout_s > 0, f"parallel.timeout_s must be > 0, got {self.timeout_s}")
        _require(self.step_timeout_s >= 0, f"parallel.step_timeout_s must be >= 0 (0 = off), got {self.step_timeout_s}")


@dataclasses.dataclass(kw_only=True)
class OffloadConfig:
    """What Megatron moves to host memory while vLLM generates (GPU memory for the KV cache)."""

    params: bool = False
    """Offload the actor's bf16 params (and their fp32 main copies) during rollout."""
    grads: bool = False
    """Free the actor's fp32 grad buffer during rollout (discarded, not copied: each step zeroes it first)."""
    optimizer: bool = False
    """Offload the (distributed) optimizer's Adam state during rollout."""
    reference: bool = False
    """Keep the frozen reference on host memory except while it scores."""
