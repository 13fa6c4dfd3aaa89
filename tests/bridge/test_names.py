"""The Megatron <-> HF name table and reshape rules (pure: no processes, no Megatron import)."""

import pytest
import torch
from safetensors import safe_open

from agpo_megatron.bridge import names
from agpo_megatron.models.hf_config import arch_from_hf_dict, read_arch
from agpo_megatron.models.tiny import save_tiny_hf_model


def _arch(model_type="qwen2", *, heads=8, groups=4, head_dim=4, hidden=16, ffn=24, layers=4, tie=False):
    cfg = dict(
        model_type=model_type,
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=head_dim,
        tie_word_embeddings=tie,
    )
    return arch_from_hf_dict(cfg)


# qwen2: qkv bias; qwen3: q/k norms. Together every rule kind and every tp_dim appears.
ARCHS = {"qwen2": _arch("qwen2"), "qwen3": _arch("qwen3")}


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_round_trip_for_every_rule(model_type, tp):
    arch = ARCHS[model_type]
    rules = names.param_rules(arch)
    assert {r.kind for r in rules} == {"copy", "qkv", "gate_up"}
    assert {r.tp_dim for r in rules} == {None, 0, 1}
    g = torch.Generator().manual_seed(tp)
    for rule in rules:
        full = torch.randn(names.full_shape(rule, arch), generator=g)
        shards = [names.shard(rule, full, r, tp) for r in range(tp)]
        for s in shards:
            expect = list(full.shape)
            if rule.tp_dim is not None:
                expect[rule.tp_dim] //= tp
            assert list(s.shape) == expect, rule.megatron
        assert torch.equal(names.unshard(rule, shards), full), rule.megatron


def test_gate_up_shards_are_swizzled_gate_then_up():
    """Each TP rank's fc1 shard is [its gate rows; its up rows], not a plain chunk of [gate; up]."""
    arch = _arch(ffn=4, hidden=1)
    rule = next(r for r in names.param_rules(arch) if r.kind == "gate_up")
    full = torch.arange(8.0)[:, None]  # rows g0 g1 g2 g3 u0 u1 u2 u3
    assert names.shard(rule, full, 0, 2).flatten().tolist() == [0, 1, 4, 5]  # g0 g1 u0 u1
    assert names.shard(rule, full, 1, 2).flatten().tolist() == [2, 3, 6, 7]  # g2 g3 u2 u3
    assert names.unshard(rule, [names.shard(rule, full, r, 2) for r in range(2)]).flatten().tolist() == list(range(8))


def test_qkv_fused_layout_groups_q_heads_with_their_kv_head():
    """4 heads, 2 groups, head dim 1: [q0 q1 k0 v0 | q2 q3 k1 v1], so a TP shard is whole groups."""
    arch = _arch(heads=4, groups=2, head_dim=1, hidden=1)
    rule = next(r for r in names.param_rules(arch) if r.megatron.endswith("linear_qkv.weight"))
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = names.hf_to_megatron(rule, [q, k, v], arch)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert names.shard(rule, fused, 1, 2).flatten().tolist() == [12, 13, 21, 31]  # group 1 only


@pytest.mark.parametrize("suffix", ["linear_qkv.weight", "linear_qkv.bias"])
def test_qkv_hf_megatron_inverse_with_gqa(suffix):
    arch = _arch(heads=4, groups=2, head_dim=8, hidden=32)
    rule = next(r for r in names.param_rules(arch) if r.megatron.endswith(suffix))
    g = torch.Generator().manual_seed(0)
    rest = (arch.hidden_size,) if suffix.endswith("weight") else ()
    hf = [
        torch.randn(4 * 8, *rest, generator=g),
        torch.randn(2 * 8, *rest, generator=g),
        torch.randn(2 * 8, *rest, generator=g),
    ]
    fused = names.hf_to_megatron(rule, hf, arch)
    assert tuple(fused.shape) == names.full_shape(rule, arch)
    back = names.megatron_to_hf(rule, fused, arch)
    assert all(torch.equal(a, b) for a, b in zip(back, hf, strict=True))
    # The other direction too: any fused tensor splits and re-fuses to itself.
    other = torch.randn(names.full_shape(rule, arch), generator=g)
    assert torch.equal(names.hf_to_megatron(rule, names.megatron_to_hf(rule, other, arch), arch), other)


def test_gate_up_hf_megatron_inverse():
    arch = _arch()
    rule = next(r for r in names.param_rules(arch) if r.kind == "gate_up")
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    fused = names.hf_to_megatron(rule, [gate, up], arch)
    assert tuple(fused.shape) == names.full_shape(rule, arch)
    out = names.megatron_to_hf(rule, fused, arch)
    assert torch.equal(out[0], gate) and torch.equal(out[1], up)


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", False)])
def test_param_rules_cover_exactly_the_hf_checkpoint(tmp_path, model_type, tie):
    hf_dir = save_tiny_hf_model(
        tmp_path,
        model_type,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_layers=3,
        vocab_size=96,
        tie=tie,
    )
    arch = read_arch(hf_dir)
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    listed = list(names.hf_names(arch))
    assert len(listed) == len(set(listed)), "an HF name is claimed by two rules"
    assert set(listed) == set(tensors)
    assert ("lm_head.weight" in listed) == (not tie)
    # The TE spec renames Megatron norms only; it maps onto the same HF tensors.
    assert list(names.hf_names(arch, "te")) == listed
    for rule in names.param_rules(arch):
        full = names.hf_to_megatron(rule, [tensors[n] for n in rule.hf], arch)
        assert tuple(full.shape) == names.full_shape(rule, arch), rule.megatron


def test_pipeline_stages_and_local_names():
    arch = _arch(layers=4)
    assert [names.layer_range(arch, s, 2) for s in range(2)] == [range(0, 2), range(2, 4)]
    by_name = {r.megatron: r for r in names.param_rules(arch)}
    assert names.stage_of(by_name["embedding.word_embeddings.weight"], arch, 2) == [0]
    assert names.stage_of(by_name["decoder.layers.3.mlp.linear_fc2.weight"], arch, 2) == [1]
    assert names.stage_of(by_name["decoder.final_layernorm.weight"], arch, 2) == [1]
    assert names.stage_of(by_name["output_layer.weight"], arch, 2) == [1]
    local = names.to_local_name("decoder.layers.3.mlp.linear_fc2.weight", 2)
    assert local == "decoder.layers.1.mlp.linear_fc2.weight"
    assert names.to_global_name(local, 2) == "decoder.layers.3.mlp.linear_fc2.weight"
    assert names.to_local_name("embedding.word_embeddings.weight", 2) == "embedding.word_embeddings.weight"
