"""Broken or unsupported HF input is refused before any conversion, naming the file and tensor.

These run `inspect_source`, the checks `hf_to_megatron` does first, in-process: no process group,
no Megatron model.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.models.hf_config import UnsupportedModelError
from agpo_megatron.models.tiny import save_tiny_hf_model
from checkpoints_conversion.hf_to_megatron import inspect_source

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_tiny_hf_model(tmp_path_factory.mktemp("pristine") / "qwen2", "qwen2", **TINY)


@pytest.fixture(scope="module")
def pristine_sharded(tmp_path_factory, pristine) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "qwen2"
    AutoModelForCausalLM.from_pretrained(pristine).save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture
def hf(tmp_path, pristine) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def edit_config(hf_dir: Path, **changes) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def test_the_pristine_model_passes(pristine, pristine_sharded):
    for d in (pristine, pristine_sharded):
        src = inspect_source(d, tp=1, pp=2)
        assert len(src.tensors) == 27 and src.arch.model_type == "qwen2"


def test_truncated_file_names_file_and_tensor(hf):
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: tensor '[\w.]+'"):
        inspect_source(hf)


def test_truncated_header_names_the_tensors_the_index_expects_there(tmp_path, pristine_sharded):
    hf = Path(shutil.copytree(pristine_sharded, tmp_path / "hf"))
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated .* the header is cut off .*'model\."):
        inspect_source(hf)


def test_missing_shard_names_file_and_tensor(tmp_path, pristine_sharded):
    hf = Path(shutil.copytree(pristine_sharded, tmp_path / "hf"))
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    held = [
        n
        for n, f in json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"].items()
        if f == shard.name
    ]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard missing.*{held[0]}"):
        inspect_source(hf)


def test_config_disagreeing_with_shapes_names_file_tensor_and_config(hf):
    edit_config(hf, intermediate_size=96)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' "
        r"has shape .* but config\.json: .*intermediate_size=96",
    ):
        inspect_source(hf)


def test_extra_layer_is_a_leftover(hf):
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.99.mlp.down_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.99\.mlp\.down_proj\.weight' "
        r"has no place in the model .*num_hidden_layers=2",
    ):
        inspect_source(hf)


def test_missing_tensor_is_named(hf):
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.post_attention_layernorm\.weight' is missing"):
        inspect_source(hf)


def test_tied_config_with_a_different_lm_head(hf):
    tensors = load_file(hf / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    edit_config(hf, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        inspect_source(hf)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model_type": "mistral"},
            r"model_type 'mistral' is not supported; supported: "
            r"\['qwen2', 'llama', 'qwen3', 'qwen3_moe', 'qwen2_moe'\]",
        ),
        ({"mlp_bias": True}, r"not supported: mlp_bias=true .* Supported: qwen2"),
        ({"use_sliding_window": True}, r"use_sliding_window=true"),
        ({"quantization_config": {"quant_method": "gptq"}}, r"quantized weights"),
    ],
)
def test_unsupported_configs_list_what_is_supported(hf, changes, message):
    edit_config(hf, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        inspect_source(hf)


def test_layout_that_does_not_divide(pristine):
    with pytest.raises(
        ValueError,
        match=r"TP=4/PP=3: num_attention_heads=2 is not divisible by tp=4; "
        r"num_key_value_heads=1 is not divisible by tp=4; "
        r"num_hidden_layers=2 is not divisible by pp=3",
    ):
        inspect_source(pristine, tp=4, pp=3)
