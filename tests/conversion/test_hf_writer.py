"""The streaming safetensors writer: byte-compatible shards, a correct index, and refusals."""

import json
import struct

import pytest
import torch
from safetensors import safe_open

from agpo_megatron.bridge.hf_writer import (
    HFCheckpointWriter,
    HFWriteError,
    TensorSpec,
    plan_shards,
    write_hf_config,
)
from agpo_megatron.checkpoint.hf_assets import copy_hf_assets


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),  # 4096 B
        "b.weight": torch.randn(16, generator=g),  # 64 B
        "c.weight": torch.randn(128, 16, generator=g).to(torch.float16),  # 4096 B
        "d.weight": torch.randint(0, 9, (3, 5), generator=g),  # int64, 120 B
    }


def specs_of(tensors):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_plan_is_greedy_in_order_and_names_like_transformers():
    specs = specs_of(make_tensors())
    shards = plan_shards(specs, max_shard_bytes=4300)
    assert [[s.name for s in sh.specs] for sh in shards] == [["a.weight", "b.weight"], ["c.weight", "d.weight"]]
    assert [sh.file for sh in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # A tensor larger than the cap gets a shard of its own; one shard means one unindexed file.
    assert [[s.name for s in sh.specs] for sh in plan_shards(specs, 100)] == [
        ["a.weight"],
        ["b.weight"],
        ["c.weight"],
        ["d.weight"],
    ]
    assert [sh.file for sh in plan_shards(specs, 10**9)] == ["model.safetensors"]


def test_sharded_output_reads_back_with_safetensors(tmp_path):
    tensors = make_tensors()
    with HFCheckpointWriter(tmp_path, specs_of(tensors), max_shard_bytes=4300) as w:
        for name, t in tensors.items():
            w.write(name, t)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4096 + 64 + 4096 + 120
    read = {}
    for file in sorted(set(index["weight_map"].values())):
        raw = (tmp_path / file).read_bytes()
        assert struct.unpack("<Q", raw[:8])[0] % 8 == 0  # header padded to 8 bytes, as the reference writer does
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert set(f.keys()) == {n for n, fl in index["weight_map"].items() if fl == file}
            read.update({k: f.get_tensor(k) for k in f.keys()})
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name
    assert not list(tmp_path.glob("*.partial"))


def test_non_contiguous_input_is_written_by_value(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()  # [4, 3], a transposed view
    with HFCheckpointWriter(tmp_path, [TensorSpec("t", (4, 3), torch.float32)]) as w:
        w.write("t", t)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def _one(value: float) -> torch.Tensor:
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t[37, 5] = value
    return t


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("b.weight", torch.zeros(16), r"'b\.weight' written out of order: the plan expects 'a\.weight' next"),
        ("a.weight", torch.zeros(64, 32), r"'a\.weight': got torch\.float32 \(64, 32\), the plan says torch\.bfloat16"),
        ("a.weight", torch.zeros(32, 64, dtype=torch.bfloat16), r"'a\.weight': got .*\(32, 64\).*\(64, 32\)"),
        ("a.weight", torch.full((64, 32), float("nan"), dtype=torch.bfloat16), r"'a\.weight' has non-finite values"),
        ("a.weight", torch.full((64, 32), float("inf"), dtype=torch.bfloat16), r"'a\.weight' has non-finite values"),
        # One bad element among finite ones (the check is a max |x| reduction, not a temporary per element).
        ("a.weight", _one(float("nan")), r"'a\.weight' has non-finite values"),
        ("a.weight", _one(float("-inf")), r"'a\.weight' has non-finite values"),
    ],
)
def test_writes_that_break_the_plan_are_refused(tmp_path, name, tensor, message):
    w = HFCheckpointWriter(tmp_path, specs_of(make_tensors()))
    with pytest.raises(HFWriteError, match=message):
        w.write(name, tensor)


def test_incomplete_export_fails_and_leaves_no_index(tmp_path):
    tensors = make_tensors()
    with pytest.raises(HFWriteError, match=r"2 tensor\(s\) never written, first \['c\.weight', 'd\.weight'\]"):
        with HFCheckpointWriter(tmp_path, specs_of(tensors), max_shard_bytes=4300) as w:
            w.write("a.weight", tensors["a.weight"])
            w.write("b.weight", tensors["b.weight"])
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_a_failure_mid_shard_leaves_only_a_partial_file(tmp_path):
    tensors = make_tensors()
    with pytest.raises(RuntimeError, match="source read failed"):
        with HFCheckpointWriter(tmp_path, specs_of(tensors)) as w:
            w.write("a.weight", tensors["a.weight"])
            raise RuntimeError("source read failed")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors.partial"]


def test_duplicate_names_in_the_plan_are_refused(tmp_path):
    spec = TensorSpec("x", (2,), torch.float32)
    with pytest.raises(HFWriteError, match=r"more than once: \['x'\]"):
        HFCheckpointWriter(tmp_path, [spec, spec])


def test_config_gets_the_export_dtype_and_assets_skip_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        ".hidden",
    ):
        (src / name).write_text("{}")
    (src / "original").mkdir()
    assert copy_hf_assets(src, tmp_path / "dst") == ["generation_config.json", "tokenizer.json"]
    write_hf_config(
        tmp_path / "dst", {"model_type": "qwen2", "torch_dtype": "float32", "dtype": "float32"}, torch.bfloat16
    )
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert cfg == {"model_type": "qwen2", "torch_dtype": "bfloat16", "dtype": "bfloat16"}
