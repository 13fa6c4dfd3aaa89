"""GPU-only model paths refuse clearly on CPU; the HF config mapping refuses what it cannot map."""

import pytest
import torch

from agpo_megatron.config import ModelConfig
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


def test_unsupported_models_are_named():
    with pytest.raises(UnsupportedModelError, match=r"model_type 'mixtral' is not supported; supported: \['qwen2'"):
        arch_from_hf_dict({"model_type": "mixtral"}, "x/config.json")
    cfg = tiny_hf_config("qwen2").to_dict()
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="rope_scaling type 'yarn'"):
        arch_from_hf_dict(cfg)
