"""The local spec's core attention through `torch.nn.functional.scaled_dot_product_attention`.

Megatron's local `DotProductAttention` is unfused: `baddbmm` into a `[b * heads, sq, sk]` score
buffer, a masked softmax (`masked_fill_` with -10000), `bmm`, and copies of the score tensor in
backward. On CPU that made the update phase 1.4x a plain `transformers` step of the same model
(docs/benchmarks.md, "update"), which attends through SDPA. This module is the same computation
in one SDPA call; `model.local_attention: megatron` keeps Megatron's class, which is the
reference in tests/models/test_sdpa_attention.py.

Same inputs, same outputs, same semantics:
- queries `[sq, b, heads, d]`, keys and values `[sk, b, groups, d]` (GQA when groups < heads),
  context `[sq, b, heads * d]` (this TP rank's heads);
- it attends with the mask models/forward.py passes every local-spec forward (causal, or
  block-diagonal causal for packed rows); without one it follows the mask type, as Megatron does.
  The padded path's plain causal mask is marked (`forward.CausalMask`) and becomes
  `attn_mask=None, is_causal=True`: on CUDA that is what lets SDPA pick its flash kernel, which
  rejects an explicit mask (with one, every call went to the memory-efficient kernel with a float
  bias of R x S^2 per layer; issue 18). Packed rows keep their mask;
- the mask is Megatron's convention, True = masked out, `[1 or b, 1, sq, sk]`; SDPA's boolean mask
  is the opposite (True = attend). Megatron fills masked scores with -10000 and SDPA with -inf:
  exp(-10000 - max) is 0 in fp32 either way, and no row here is fully masked
  (models/forward.py gives a packed row's padding its own block);
- the scale is the layer's `softmax_scale`.

It defers to Megatron's implementation where the two would differ: a softmax offset
(`softmax_type` other than vanilla), sliding-window layers, query-key layer scaling (an fp16
overflow guard that rescales inside the softmax), attention dropout while training (Megatron
draws it from its TP-aware RNG tracker), and packed THD params (those belong to the TE spec).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from agpo_megatron.models.forward import CausalMask


class SDPADotProductAttention(DotProductAttention):
    """`DotProductAttention` whose forward is one `scaled_dot_product_attention` call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self._sdpa = (
            self.softmax_offset is None
            and getattr(self.scale_mask_softmax, "window_size", None) is None
            and not cfg.apply_query_key_layer_scaling
            and getattr(cfg, "softmax_type", "vanilla") == "vanilla"
        )

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, heads, d]
        key: torch.Tensor,  # [sk, b, groups, d]
        value: torch.Tensor,  # [sk, b, groups, d]
        attention_mask: torch.Tensor | None,  # [1 or b, 1, sq, sk] bool, True = masked
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:  # [sq, b, heads * d]
        dropout = self.attention_dropout.p if self.training else 0.0
        if not self._sdpa or dropout > 0.0 or packed_seq_params is not None or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        sq, b = query.shape[:2]
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, d]
        k = key.permute(1, 2, 0, 3)  # [b, groups, sk, d]
        v = value.permute(1, 2, 0, 3)
        # Query head i reads key/value head i // (heads / groups), as Megatron's repeat_interleave
        # does. CPU's flash kernel does that itself (`enable_gqa`, 13% faster fwd+bwd at the demo's
        # shape than repeating); on CUDA the memory-efficient kernel (packed rows' masks) does not, and
        # a call that misses flash (dtype, head dim) lands there: repeat.
        rep = q.shape[1] // k.shape[1]
        gqa = rep > 1 and q.device.type == "cpu"
        if rep > 1 and not gqa:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if isinstance(attention_mask, CausalMask) and q.shape[2] == k.shape[2]:
            mask, causal = None, True  # no mask: CUDA's flash kernel takes no attn_mask
        else:  # packed rows' block-diagonal mask: the memory-efficient kernel
            mask = None if attention_mask is None else ~attention_mask
            causal = mask is None and self._causal(attn_mask_type)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=gqa,
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _causal(self, attn_mask_type: Any) -> bool:
        return (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal


def with_sdpa_attention(layer_spec):
    """The local layer spec with `SDPADotProductAttention` as its self-attention's core attention."""
    import dataclasses

    attn = layer_spec.submodules.self_attention
    subs = dataclasses.replace(attn.submodules, core_attention=SDPADotProductAttention)
    attn = dataclasses.replace(attn, submodules=subs)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn))
