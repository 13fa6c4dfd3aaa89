"""Megatron <-> HF parameter names and reshape rules: one declarative table, pure functions.

Both the vLLM weight sync (bridge/export.py) and checkpoint conversion (checkpoints_conversion/)
consume this table. A Megatron tensor here is always the *full* (TP-unsharded) tensor in its
canonical layout:

- `linear_qkv` rows are grouped per query group: for each of the `num_query_groups` groups,
  [that group's q heads (heads/groups x head_dim); its k head; its v head]. TP shards are
  contiguous row blocks of whole groups, so sharding is a plain chunk along dim 0.
- `linear_fc1` is [gate; up] in the canonical form, but *each TP shard* is [gate_r; up_r]; `shard`
  and `unshard` below do that swizzle.
- Column-parallel tensors (qkv, fc1, embedding, output_layer) split on dim 0; row-parallel
  (linear_proj, linear_fc2) on dim 1; norms are replicated.

Layer indices in `ParamRule.megatron` are *global*; a PP stage's module holds local indices
(`offset = pp_rank * num_layers / pp`).

Mixture-of-experts layers (`arch.is_moe`, issue 23) replace the MLP by a router
(`mlp.router.weight` <- HF `mlp.gate.weight`, replicated) and routed experts
(`mlp.experts.local_experts.{e}.linear_fc1/2.weight`, Megatron's SequentialMLP). Expert indices in
`ParamRule.megatron` are *global* too: expert-parallel rank `r` holds experts
`[r * E/ep, (r + 1) * E/ep)` as local indices `0 .. E/ep - 1` (`expert_offset`). An expert's fc1/fc2
split over the expert-tensor-parallel (ETP) group on the same dims as the dense MLP over TP.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Literal

import torch

from agpo_megatron.models.hf_config import ModelArch

Kind = Literal["copy", "qkv", "gate_up"]


@dataclasses.dataclass(frozen=True)
class ParamRule:
    megatron: str
    """Megatron name (global layer index)."""
    hf: tuple[str, ...]
    """HF names merged into / split from it, in order."""
    kind: Kind
    """How the HF tensors combine: one-to-one, fused QKV, or fused gate/up."""
    tp_dim: int | None
    """Dim split across TP ranks (None = replicated); for a routed expert, across ETP ranks."""
    expert: int | None = None
    """Global index of the routed expert this weight belongs to (one EP rank owns it); None otherwise."""


def _layer_rules(arch: ModelArch, i: int, spec: str) -> list[ParamRule]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    te = spec == "te"
    # TE fuses the pre-norms into the following linear layer.
    in_norm = m + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight")
    mlp_norm = m + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight")
    if arch.is_moe:  # the MoE layer's norm is a separate module on both specs (no fused fc1)
        mlp_norm = m + "pre_mlp_layernorm.weight"
    rules = [
        ParamRule(in_norm, (h + "input_layernorm.weight",), "copy", None),
        ParamRule(
            m + "self_attention.linear_qkv.weight", tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv", 0
        ),
        ParamRule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy", 1),
        ParamRule(mlp_norm, (h + "post_attention_layernorm.weight",), "copy", None),
        *(_moe_rules(arch, m, h) if arch.is_moe else _mlp_rules(m + "mlp.", h + "mlp.")),
    ]
    if arch.qkv_bias:
        rules.insert(
            2,
            ParamRule(
                m + "self_attention.linear_qkv.bias", tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", 0
            ),
        )
    if arch.qk_layernorm:
        rules += [
            ParamRule(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), "copy", None),
            ParamRule(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), "copy", None),
        ]
    return rules


def _mlp_rules(m: str, h: str, expert: int | None = None) -> list[ParamRule]:
    """A SwiGLU MLP: Megatron prefix `m` (fc1 = [gate; up], fc2) <- HF prefix `h` (gate/up/down_proj)."""
    return [
        ParamRule(m + "linear_fc1.weight", (h + "gate_proj.weight", h + "up_proj.weight"), "gate_up", 0, expert),
        ParamRule(m + "linear_fc2.weight", (h + "down_proj.weight",), "copy", 1, expert),
    ]


def _moe_rules(arch: ModelArch, m: str, h: str) -> list[ParamRule]:
    rules = [ParamRule(m + "mlp.router.weight", (h + "mlp.gate.weight",), "copy", None)]
    for e in range(arch.num_experts):
        rules += _mlp_rules(m + f"mlp.experts.local_experts.{e}.", h + f"mlp.experts.{e}.", expert=e)
    if arch.shared_expert_ffn_hidden_size:  # qwen2_moe: split over TP like a dense MLP; its gate replicated
        rules += _mlp_rules(m + "mlp.shared_experts.", h + "mlp.shared_expert.")
        gate = ParamRule(m + "mlp.shared_experts.gate_weight", (h + "mlp.shared_expert_gate.weight",), "copy", None)
        rules.append(gate)
    return rules


def param_rules(arch: ModelArch, spec: str = "local") -> list[ParamRule]:
    """Every parameter of the model, in HF checkpoint order (embedding, layers, norm, head)."""
    rules = [ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy", 0)]
    for i in range(arch.num_layers):
        rules += _layer_rules(arch, i, spec)
    rules.append(ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None))
    if not arch.tie_word_embeddings:
        rules.append(ParamRule("output_layer.weight", ("lm_head.weight",), "copy", 0))
    return rules


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _shift(name: str, layer_offset: int, expert_offset: int) -> str:
    name = _LAYER.sub(lambda mt: f"decoder.layers.{int(mt.group(1)) + layer_offset}.", name, count=1)
    return _EXPERT.sub(lambda mt: f".local_experts.{int(mt.group(1)) + expert_offset}.", name, count=1)


def to_global_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """`decoder.layers.3.x` on a stage starting at layer 8 -> `decoder.layers.11.x`; a local expert
    index on an EP rank whose first expert is `expert_offset` -> the global index."""
    return _shift(local_name, layer_offset, expert_offset)


def to_local_name(global_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    return _shift(global_name, -layer_offset, -expert_offset)


def expert_offset(arch: ModelArch, ep_rank: int, ep: int) -> int:
    """Global index of expert-parallel rank `ep_rank`'s first expert."""
    return ep_rank * (arch.num_experts // ep) if arch.is_moe else 0


def ep_owner(rule: ParamRule, arch: ModelArch, ep: int) -> int | None:
    """The expert-parallel rank holding this routed expert's weight (None: not an expert weight)."""
    return None if rule.expert is None else rule.expert // (arch.num_experts // ep)


def layer_range(arch: ModelArch, pp_rank: int, pp: int) -> range:
    per = arch.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def stage_of(rule: ParamRule, arch: ModelArch, pp: int) -> list[int]:
    """PP stages that hold this parameter (the tied output copy lives on first and last)."""
    mt = _LAYER.match(rule.megatron)
    if mt:
        return [int(mt.group(1)) // (arch.num_layers // pp)]
    if rule.megatron.startswith("embedding."):
        return [0]
    return [pp - 1]  # final norm, output_layer


# ---- reshape rules (pure) -------------------------------------------------------------------


def _qkv_sizes(arch: ModelArch) -> tuple[int, int]:
    q_per_group = arch.num_attention_heads // arch.num_query_groups
    return q_per_group * arch.head_dim, arch.head_dim


def hf_to_megatron(rule: ParamRule, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """HF tensors (in `rule.hf` order) -> the full Megatron tensor."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors  # [heads*hd, H] / [groups*hd, H] (or 1-D biases)
    qg, hd = _qkv_sizes(arch)
    g = arch.num_query_groups
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, qg, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)], dim=1)
    return fused.reshape(g * (qg + 2 * hd), *rest)


def megatron_to_hf(rule: ParamRule, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """The full Megatron tensor -> HF tensors in `rule.hf` order (inverse of hf_to_megatron)."""
    if rule.kind == "copy":
        return [full]
    if rule.kind == "gate_up":
        return list(full.chunk(2, dim=0))
    qg, hd = _qkv_sizes(arch)
    g = arch.num_query_groups
    rest = full.shape[1:]
    grouped = full.reshape(g, qg + 2 * hd, *rest)
    q, k, v = grouped.split([qg, hd, hd], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def shard(rule: ParamRule, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor."""
    if rule.tp_dim is None or tp == 1:
        return full
    if rule.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=rule.tp_dim)[tp_rank]


def unshard(rule: ParamRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard` given all TP ranks' slices in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)


def full_shape(rule: ParamRule, arch: ModelArch) -> tuple[int, ...]:
    """Shape of the full Megatron tensor, computable on every rank without communication."""
    H, hd = arch.hidden_size, arch.head_dim
    name = rule.megatron
    if rule.expert is not None:
        f = arch.moe_ffn_hidden_size
        return (2 * f, H) if name.endswith("linear_fc1.weight") else (H, f)
    if name.endswith("mlp.router.weight"):
        return (arch.num_experts, H)
    if ".mlp.shared_experts." in name:  # qwen2_moe's shared expert and its gate
        f = arch.shared_expert_ffn_hidden_size
        return {"linear_fc1.weight": (2 * f, H), "linear_fc2.weight": (H, f), "gate_weight": (1, H)}[
            name.rsplit("shared_experts.", 1)[1]
        ]
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        return (arch.vocab_size, H)
    if name.endswith("linear_qkv.weight"):
        return ((arch.num_attention_heads + 2 * arch.num_query_groups) * hd, H)
    if name.endswith("linear_qkv.bias"):
        return ((arch.num_attention_heads + 2 * arch.num_query_groups) * hd,)
    if name.endswith("linear_proj.weight"):
        return (H, arch.num_attention_heads * hd)
    if name.endswith("linear_fc1.weight"):
        return (2 * arch.ffn_hidden_size, H)
    if name.endswith("linear_fc2.weight"):
        return (H, arch.ffn_hidden_size)
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (hd,)
    return (H,)  # norms


def hf_names(arch: ModelArch, spec: str = "local") -> Iterator[str]:
    for rule in param_rules(arch, spec):
        yield from rule.hf
