"""2-rank worker: the local spec's SDPA core attention against Megatron's `DotProductAttention`.

At TP=1 and TP=2 (each rank holds half the heads), GQA (4 query heads, 2 groups, head dim 64),
fp32, both modules get the same queries, keys and values and the same masks: the padded path's
causal mask `[1, 1, S, S]` (a `CausalMask`: SDPA runs it mask-free, `is_causal=True`), a packed
batch's block-diagonal mask `[B, 1, S, S]`, and no mask under the causal mask type. Rank 0 of each
layout writes OUT_DIR/tp{tp}.pt: per case, both
modules' context and the gradients of q, k and v for the same upstream gradient. A training-mode
module with attention dropout is checked to defer to Megatron's implementation.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.models.forward import causal_mask, packed_causal_mask
from agpo_megatron.models.sdpa_attention import SDPADotProductAttention
from agpo_megatron.runtime import cpu_platform
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from tests.gpu.common import tiny_arch

out_dir = Path(sys.argv[1])
arch = tiny_arch("float32")  # GQA: 4 query heads in 2 groups
S, B = 24, 3
seq_ids = torch.tensor([[0] * 5 + [1] * 12 + [2] * 7, [0] * 20 + [-1] * 4, [0] * 9 + [1] * 9 + [-1] * 6])


def run(module, q, k, v, mask, mask_type, grad_out):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    with cpu_platform.megatron_scope():  # Megatron's default causal mask is built on "cuda"
        out = module(q, k, v, mask, attn_mask_type=mask_type)
    out.backward(grad_out)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def sdpa_kwargs(module, *args) -> list[dict]:
    """The mask arguments of every SDPA call `module(*args)` makes."""
    calls = []
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append({"attn_mask": kw.get("attn_mask"), "is_causal": kw.get("is_causal")})
        return sdpa_fn(*a, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        module(*args)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa_fn
    return calls


def sdpa_called(module, *args) -> bool:
    calls = []
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or sdpa_fn(*a, **kw)
    try:
        module(*args)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa_fn
    return bool(calls)


for tp in (1, 2):
    from megatron.core.transformer.enums import AttnMaskType

    lay = init_model_parallel(tp, 1, seed=1)
    cfg = build.transformer_config(arch, ModelConfig(params_dtype="float32", spec="local"), ParallelConfig(tp=tp))
    heads, groups = arch.num_attention_heads // tp, arch.num_query_groups // tp
    g = torch.Generator().manual_seed(0)  # the full tensors, identical on every rank; this rank's heads sliced out
    q = torch.randn(S, B, arch.num_attention_heads, arch.head_dim, generator=g)
    k = torch.randn(S, B, arch.num_query_groups, arch.head_dim, generator=g)
    v = torch.randn(S, B, arch.num_query_groups, arch.head_dim, generator=g)
    grad = torch.randn(S, B, arch.num_attention_heads * arch.head_dim, generator=g)
    r = lay.tp_rank
    q, k, v = (
        q[:, :, r * heads : (r + 1) * heads],
        k[:, :, r * groups : (r + 1) * groups],
        v[:, :, r * groups : (r + 1) * groups],
    )
    grad = grad[:, :, r * heads * arch.head_dim : (r + 1) * heads * arch.head_dim]

    res = {}
    cases = {
        "causal_mask": (causal_mask(S, q.device), AttnMaskType.arbitrary),
        "packed_mask": (packed_causal_mask(seq_ids), AttnMaskType.arbitrary),
        "no_mask_causal_type": (None, AttnMaskType.causal),
    }
    for name, (mask, mask_type) in cases.items():
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
        sdpa = SDPADotProductAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
        res[name] = {
            "megatron": run(ref, q, k, v, mask, mask_type, grad),
            "sdpa": run(sdpa, q, k, v, mask, mask_type, grad),
        }
        calls = sdpa_kwargs(sdpa, q, k, v, mask, mask_type)
        res[name]["sdpa_calls"] = [(c["attn_mask"] is None, c["is_causal"]) for c in calls]
    # Activation recompute detaches every input of the recomputed layer: the mark must survive it.
    detached = torch.utils.checkpoint.detach_variable((causal_mask(S, q.device),))[0]
    calls = sdpa_kwargs(sdpa, q, k, v, detached, AttnMaskType.arbitrary)
    res["recompute_sdpa_calls"] = [(c["attn_mask"] is None, c["is_causal"]) for c in calls]

    # Dropout while training is Megatron's (its TP-aware RNG): SDPA must not take that path.
    sdpa = SDPADotProductAttention(
        cfg, layer_number=1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self", attention_dropout=0.5
    ).train()
    res["dropout_training_used_sdpa"] = sdpa_called(sdpa, q, k, v, causal_mask(S, q.device))
    if r == 0:
        torch.save(res, out_dir / f"tp{tp}.pt")
    dist.barrier()
exit_cleanly(0)
