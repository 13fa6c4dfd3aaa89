"""GPU-only model paths refuse clearly on CPU; the HF config mapping refuses what it cannot map."""

import pytest
import torch

from agpo_megatron.config.model import ModelConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import UnsupportedModelError, arch_from_hf_dict
from agpo_megatron.models.tiny import tiny_hf_config

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")


@cpu_only
def test_te_spec_and_fp8_raise_on_cpu():
    assert build.resolve_spec(ModelConfig(spec="auto")) == "local"
    with pytest.raises(RuntimeError, match="model.spec=te needs CUDA"):
        build.resolve_spec(ModelConfig(spec="te"))
    with pytest.raises(RuntimeError, match="model.fp8='e4m3' needs the Transformer Engine spec on a GPU"):
        build.resolve_spec(ModelConfig(spec="auto", fp8="e4m3"))


def test_hf_config_mapping_per_architecture():
    qwen2 = arch_from_hf_dict(tiny_hf_config("qwen2", tie=True).to_dict())
    assert qwen2.qkv_bias and not qwen2.qk_layernorm and qwen2.tie_word_embeddings
    qwen3 = arch_from_hf_dict(tiny_hf_config("qwen3", num_heads=2, head_dim=48).to_dict())
    assert qwen3.qk_layernorm and qwen3.kv_channels == 48 and not qwen3.qkv_bias
    llama = arch_from_hf_dict(tiny_hf_config("llama").to_dict())
    assert llama.rope_scaling["rope_type"] == "llama3" and not llama.qkv_bias


def test_qwen3_moe_mapping_and_routing_kwargs():
    cfg = tiny_hf_config("qwen3_moe", num_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2).to_dict()
    arch = arch_from_hf_dict(cfg)
    assert (arch.num_experts, arch.moe_topk, arch.moe_ffn_hidden_size) == (8, 2, 64)
    assert arch.is_moe and arch.norm_topk_prob and arch.qk_layernorm
    from agpo_megatron.config.model import ParallelConfig

    kw = build.moe_kwargs(arch, ModelConfig(moe_aux_loss_coef=0.01), ParallelConfig(ep=2), on_gpu=False)
    # Renormalised top-k = top-k of the logits then softmax over the k (pre_softmax off).
    assert kw["moe_router_pre_softmax"] is False and kw["moe_router_score_function"] == "softmax"
    assert kw["moe_token_dispatcher_type"] == "allgather" and kw["expert_model_parallel_size"] == 2
    assert kw["moe_aux_loss_coeff"] == 0.01 and kw["moe_router_load_balancing_type"] == "aux_loss"
    assert (
        build.moe_kwargs(arch, ModelConfig(), ParallelConfig(), on_gpu=True)["moe_token_dispatcher_type"] == "alltoall"
    )
    assert (
        build.moe_kwargs(
            arch_from_hf_dict(tiny_hf_config("qwen3").to_dict()), ModelConfig(), ParallelConfig(), on_gpu=False
        )
        == {}
    )
    for bad, needle in [
        ({"mlp_only_layers": [0]}, "only all-MoE layers"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok > 0"),
    ]:
        with pytest.raises(UnsupportedModelError, match=needle):
            arch_from_hf_dict({**cfg, **bad})
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen3' with experts is not supported"):
        arch_from_hf_dict({**tiny_hf_config("qwen3").to_dict(), "num_experts": 4})


def test_unsupported_models_are_named():
    with pytest.raises(UnsupportedModelError, match=r"model_type 'mixtral' is not supported; supported: \['qwen2'"):
        arch_from_hf_dict({"model_type": "mixtral"}, "x/config.json")
    cfg = tiny_hf_config("qwen2").to_dict()
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'yarn'"):
        arch_from_hf_dict(cfg)


def _worker_result(tmp_path, check: str) -> list[str]:
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from tests.dist import torchrun

    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=128
    )
    out = torchrun("build_paths.py", hf_dir, check, nproc=1, timeout=180)
    return next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]


def test_fusion_flags_follow_importable_kernels(monkeypatch):
    """D2: masked-softmax fusion only where Megatron's softmax kernels import; nothing fused on CPU."""
    assert not any(build.fusion_flags(on_gpu=False).values())
    monkeypatch.setattr(build, "_importable", lambda m: False)
    gpu_no_kernels = build.fusion_flags(on_gpu=True)
    assert not gpu_no_kernels["masked_softmax_fusion"] and not gpu_no_kernels["persist_layer_norm"]
    monkeypatch.setattr(build, "_importable", lambda m: True)
    assert build.fusion_flags(on_gpu=True)["masked_softmax_fusion"]


@pytest.mark.slow
def test_local_spec_final_norm_is_rmsnorm_even_with_apex(tmp_path):
    """D2: Megatron's default block norm is apex's FusedLayerNorm when apex imports; it rejects RMSNorm."""
    assert _worker_result(tmp_path, "final_norm") == [
        "RMSNorm"
    ]  # torch.nn.RMSNorm, through Megatron's WrappedTorchNorm


@pytest.mark.slow
def test_fp16_loss_is_scaled_like_its_grads_are_unscaled(tmp_path):
    """D4: fp16 grad norm equals fp32's (was divided by the loss scale: no grad_scale_func)."""
    fp32, fp16, skipped = map(float, _worker_result(tmp_path, "fp16_scale"))
    assert fp32 > 0 and skipped == 0.0
    assert abs(fp16 - fp32) / fp32 < 0.05, (fp32, fp16)


def test_fp8_recipe_settings_reach_the_transformer_config():
    """Issue 8: the FP8 recipe is configurable, with Megatron-Bridge's delayed-scaling values as defaults."""
    from agpo_megatron.config.yaml_io import ConfigError

    assert build.fp8_kwargs(ModelConfig()) == {}
    assert build.fp8_kwargs(ModelConfig(fp8="hybrid")) == dict(
        fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024, fp8_amax_compute_algo="max"
    )
    custom = build.fp8_kwargs(
        ModelConfig(fp8="e4m3", fp8_recipe="tensorwise", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    )
    assert custom["fp8_recipe"] == "tensorwise" and custom["fp8_amax_history_len"] == 16
    with pytest.raises(ConfigError, match="model.fp8_amax_history_len must be >= 1"):
        ModelConfig(fp8_amax_history_len=0)


def test_rope_fusion_on_the_te_spec_only_where_the_fused_kernels_import(monkeypatch):
    """Issue 18 item 4: `apply_rope_fusion` was hard-coded off, so the TE spec's packed THD path ran
    Megatron's unfused RoPE (a host sync and a split/cat per sequence, per layer). The local spec keeps
    it off: its packed path's per-row frequencies are not what the fused kernel takes."""
    monkeypatch.setattr(build, "fused_rope_available", lambda: True)
    assert build.fusion_flags(on_gpu=True, spec="te")["apply_rope_fusion"]
    assert not build.fusion_flags(on_gpu=True, spec="local")["apply_rope_fusion"]
    assert not build.fusion_flags(on_gpu=False, spec="te")["apply_rope_fusion"]
    monkeypatch.setattr(build, "fused_rope_available", lambda: False)
    assert not build.fusion_flags(on_gpu=True, spec="te")["apply_rope_fusion"]
    monkeypatch.undo()
    assert build.fused_rope_available() == _te_importable()  # CPU here: no TE, so no fused kernels


def _te_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None
