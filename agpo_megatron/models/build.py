"""Build the actor and the reference: HF architecture -> TransformerConfig -> GPTModel (+ DDP, optimizer).

The layer spec is Transformer Engine on GPU and Megatron-local on CPU (TE does not build without
CUDA). FP8 only exists through TE; asking for it, or for the TE spec, on CPU is a clear error.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from agpo_megatron.models.hf_config import ModelArch, llama3_inv_freq
from agpo_megatron.runtime import cpu_platform

if TYPE_CHECKING:
    from agpo_megatron.config.model import ModelConfig, ParallelConfig
    from agpo_megatron.config.schema import OptimConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`ModelConfig.params_dtype` names -> torch dtypes (also the rollout engine's `dtype`)."""


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def resolve_spec(model_cfg: ModelConfig) -> str:
    """'te' or 'local'. Raises if TE/FP8 is asked for where it cannot run."""
    spec = model_cfg.spec
    if spec == "auto":
        spec = "te" if cpu_platform.cuda_present() and te_available() else "local"
    if spec == "te" and not cpu_platform.cuda_present():
        raise RuntimeError("model.spec=te needs CUDA (Transformer Engine does not run on CPU); use model.spec=local")
    if spec == "te" and not te_available():
        raise RuntimeError("model.spec=te but transformer_engine is not importable; pip install 'agpo-megatron[gpu]'")
    if model_cfg.fp8 is not None and spec != "te":
        raise RuntimeError(
            f"model.fp8={model_cfg.fp8!r} needs the Transformer Engine spec on a GPU (got spec {spec!r})"
        )
    return spec


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fused_rope_available() -> bool:
    """Whether Megatron found Transformer Engine's fused RoPE kernels (THD and BSHD)."""
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except ImportError:
        return False
    return getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None and (
        getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
    )


def fusion_flags(on_gpu: bool, spec: str = "local") -> dict[str, bool]:
    """Megatron's fusion switches, each on only where the kernel behind it can run.

    RoPE fusion (issue 18): on the TE spec where TE's fused kernels import. Unfused, Megatron's
    packed THD RoPE syncs with the host (`cu_seqlens.tolist()`) and splits/concatenates per sequence,
    per layer, for queries and keys. Never on the local spec: its packed path rotates by per-row
    frequencies `[S, R, 1, D]` (models/forward.py::_rope_at), which the fused kernel cannot take.

    NOTE (issue 8 D2): Megatron imports the masked-softmax kernels lazily, inside the forward, so a
    flag set without them crashes at the first step instead of at build. The bias+SwiGLU and
    bias+dropout fusions are `torch.jit`/`torch.compile` code (no extension needed on GPU); on CPU
    they stay off to keep the CPU tier plain eager. Persistent layer norm and gradient-accumulation
    fusion need apex/TE extensions, and the norm is chosen in `_block_spec` anyway.
    """
    softmax_kernels = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda")
    return dict(
        masked_softmax_fusion=on_gpu and all(_importable(m) for m in softmax_kernels),
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=on_gpu and spec == "te" and fused_rope_available(),
    )


def fp8_kwargs(model_cfg: ModelConfig) -> dict:
    """TransformerConfig's FP8 fields from the model config ({} without FP8)."""
    if not model_cfg.fp8:
        return {}
    return dict(
        fp8=model_cfg.fp8,
        fp8_recipe=model_cfg.fp8_recipe,
        fp8_margin=model_cfg.fp8_margin,
        fp8_amax_history_len=model_cfg.fp8_amax_history_len,
        fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo,
    )


def transformer_config(arch: ModelArch, model_cfg: ModelConfig, parallel_cfg: ParallelConfig):
    from megatron.core.transformer import TransformerConfig

    if arch.vocab_size % parallel_cfg.tp:
        raise ValueError(f"vocab_size {arch.vocab_size} must be divisible by parallel.tp={parallel_cfg.tp}")
    dtype = DTYPES[model_cfg.params_dtype]
    on_cpu = not cpu_platform.cuda_present()
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if model_cfg.recompute_activations
        else {}
    )
    fp8 = fp8_kwargs(model_cfg)
    moe = moe_kwargs(arch, model_cfg, parallel_cfg, on_gpu=not on_cpu)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,  # RL fine-tuning: dropout would make old/new log-probs disagree
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # The loss divides by the *global* token count itself (algo/loss.py); with this flag
        # Megatron neither divides by num_microbatches nor averages grads over DP.
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        **fusion_flags(on_gpu=not on_cpu, spec="local" if on_cpu else resolve_spec(model_cfg)),
        **recompute,
        **fp8,
        **moe,
    )


def moe_kwargs(arch: ModelArch, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, on_gpu: bool) -> dict:
    """TransformerConfig's MoE fields for an MoE architecture ({} for a dense one).

    Routing as HF Qwen3-MoE: softmax over all experts, top-k. With `norm_topk_prob` HF renormalises
    the k probabilities, which equals a softmax over the k chosen logits (Megatron's
    `moe_router_pre_softmax=False`: top-k on the logits, then softmax); without it the k
    probabilities stay as the full softmax gave them (`pre_softmax=True`). Both forms are checked
    against transformers (tests/models/test_moe_parity.py).

    Token dispatcher: all-to-all on GPU (what Megatron recommends with EP); all-gather on CPU:
    Megatron's all-to-all dispatcher calls `all_to_all_single` with uneven split sizes, which gloo
    rejects at EP > 1, while the all-gather dispatcher runs forward and backward on gloo at EP=1 and 2.
    Experts are Megatron's SequentialMLP (one SwiGLU per local expert, `moe_grouped_gemm=False`),
    on both specs, so both share one set of parameter names (bridge/names.py). Qwen2-MoE's shared
    expert is Megatron's gated `SharedExpertMLP` (`mlp.shared_experts`).
    """
    if not arch.is_moe:
        return {}
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if model_cfg.moe_aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=model_cfg.moe_aux_loss_coef,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        # qwen2_moe: one shared SwiGLU expert, gated per token by sigmoid(gate_weight . x), as HF's
        # shared_expert / shared_expert_gate; Megatron splits it over TP like a dense MLP.
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=arch.shared_expert_ffn_hidden_size > 0,
        expert_model_parallel_size=parallel_cfg.ep,
        expert_tensor_parallel_size=parallel_cfg.etp,
    )


def _not_the_gptmodel_deprecation(record: logging.LogRecord) -> bool:
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED ..." at every build (it points to HybridModel).
    GPTModel is what 0.16.1-0.19.x share, so the notice says nothing a user can act on here."""
    return not record.getMessage().startswith("GPTModel IS DEPRECATED")


def build_gpt(arch: ModelArch, model_cfg: ModelConfig, parallel_cfg: ParallelConfig):
    """One GPTModel chunk for this rank's pipeline stage (no DDP)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_not_the_gptmodel_deprecation)
    spec_name = resolve_spec(model_cfg)
    tf_config = transformer_config(arch, model_cfg, parallel_cfg)
    experts = dict(num_experts=arch.num_experts, moe_grouped_gemm=False) if arch.is_moe else {}
    if spec_name == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, **experts)
    else:
        spec = _arbitrary_mask(
            get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm", **experts)
        )
        if model_cfg.local_attention == "sdpa":
            from agpo_megatron.models.sdpa_attention import with_sdpa_attention

            spec = with_sdpa_attention(spec)
    spec = _block_spec(tf_config, spec, spec_name)
    rs = arch.rope_scaling
    with cpu_platform.megatron_scope():
        model = GPTModel(
            config=tf_config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=max(model_cfg.max_seq_len, 1),
            pre_process=mpu.is_pipeline_first_stage(),
            post_process=mpu.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=rs is not None,
            rope_scaling_factor=float(rs["factor"]) if rs else 8.0,
        )
        if rs is not None:
            # Megatron hard-codes Llama-3.1's scaling constants; use the checkpoint's own.
            model.rotary_pos_emb.inv_freq = llama3_inv_freq(arch).to(model.rotary_pos_emb.inv_freq.device)
        if cpu_platform.cuda_present():
            model.cuda(torch.cuda.current_device())
    model.agpo_spec = spec_name  # how models/forward.py feeds packed micro-batches (THD or a mask)
    return model


def _arbitrary_mask(layer_spec):
    """The local spec's self-attention with `AttnMaskType.arbitrary`: it attends with the mask passed in.

    NOTE: with `causal`, Megatron's fused softmax (GPU, fp16/bf16, when its kernel imports) runs
    the upper-triangular kernel and ignores the mask it is given, which would let packed sequences
    see each other. models/forward.py passes every local-spec forward an explicit mask (causal,
    or block-diagonal for packed rows); the plain-PyTorch softmax (CPU) used it either way.
    """
    import dataclasses

    from megatron.core.transformer.enums import AttnMaskType

    attn = layer_spec.submodules.self_attention
    attn = dataclasses.replace(attn, params={**attn.params, "attn_mask_type": AttnMaskType.arbitrary})
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn))


def _block_spec(tf_config, layer_spec, spec_name: str):
    """The decoder block with a final norm chosen by spec, not by what happens to be importable.

    NOTE (issue 8 D2): given a *layer* spec, Megatron picks the final norm itself: TE's if TE
    imports, else apex's FusedLayerNorm if apex imports (which rejects RMSNorm), else torch's. So a
    GPU box with apex but without TE crashed at build. The local spec always gets torch's RMSNorm
    (Megatron's local layer spec uses it for RMSNorm too); the TE spec gets TENorm.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if spec_name == "te":
        from megatron.core.extensions.transformer_engine import TENorm as norm
    else:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm as norm
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(tf_config), layer_norm=norm)


def wrap_for_training(model, optim_cfg: OptimConfig, parallel_cfg: ParallelConfig, total_steps: int):
    """Megatron DDP + (distributed) optimizer + LR schedule. Returns (ddp_model, optimizer, scheduler)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tf_config = model.config
    with cpu_platform.megatron_scope():
        ddp = DistributedDataParallel(
            config=tf_config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
            ),
            module=model,
        )
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim_cfg.lr,
                min_lr=optim_cfg.min_lr,
                weight_decay=optim_cfg.weight_decay,
                adam_beta1=optim_cfg.adam_beta1,
                adam_beta2=optim_cfg.adam_beta2,
                adam_eps=optim_cfg.adam_eps,
                clip_grad=optim_cfg.clip_grad,
                bf16=tf_config.bf16,
                fp16=tf_config.fp16,
                params_dtype=tf_config.params_dtype,
                use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
                # fp16 only: a static scale, or dynamic from `initial_loss_scale` (halved on overflow).
                loss_scale=optim_cfg.loss_scale,
                initial_loss_scale=optim_cfg.initial_loss_scale,
            ),
            [ddp],
        )
    # NOTE (issue 8 D4): Megatron's schedule multiplies each micro-batch loss by grad_scale_func(1),
    # and the fp16 optimizer divides the grads by the same scale. Without this hook the loss is
    # never scaled but the grads are still unscaled (divided by 2^32 by default). bf16/fp32: 1.
    tf_config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.warmup_steps,
        lr_decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
        lr_decay_style=optim_cfg.decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return ddp, optimizer, scheduler


def freeze(model) -> None:
    """The reference policy: eval mode, no grads, never given to an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
