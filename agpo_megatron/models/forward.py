"""Per-token log-probs and entropy through Megatron's pipeline schedule, vocab-parallel.

Convention for every per-token tensor here and in the trainer: position t of a `[B, S]` tensor
belongs to the prediction of `tokens[:, t + 1]`; `targets = tokens` shifted left by one, and
`loss_mask[b, t] = 1` where `targets[b, t]` is a response token. The full vocabulary is never
gathered: each TP rank holds logits `[B, S, V/TP]` and the softmax statistics are all-reduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from agpo_megatron.models import moe, routing
from agpo_megatron.runtime import cpu_platform

MicroBatch = dict[str, torch.Tensor]  # "tokens" [B, S] plus per-token / per-seq extras


class CausalMask(torch.Tensor):
    """A plain causal mask (True = masked), marked as such.

    The local spec's mask type is `arbitrary` (models/build.py), so its attention must be given a
    mask. Megatron's own `DotProductAttention` reads this one as any mask; the SDPA core attention
    (models/sdpa_attention.py) recognises it and calls SDPA with `attn_mask=None, is_causal=True`
    instead: PyTorch's CUDA flash kernel rejects any explicit `attn_mask` (issue 18). The mark
    survives `detach()`, which activation recompute applies to every input of a recomputed layer;
    any other op on it gives a plain tensor.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(cls) if func is torch.Tensor.detach else out


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:  # [1, 1, S, S] bool
    """True = masked (a `CausalMask`). Passed explicitly: Megatron's default mask is built on "cuda"."""
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
    return mask.as_subclass(CausalMask)


def packed_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:  # [R, S] -> [R, 1, S, S] bool
    """True = masked: a token sees the earlier tokens of its own sequence only (block-diagonal causal).

    A row's end padding (`seq_ids` -1) is one more block, so no softmax row is empty. Megatron's
    local attention fills masked scores with -10000, not -inf (`attention_mask_func`), exactly as
    for the padded path's causal mask, so a masked key contributes exp(-10000 - max) = 0 in both.
    """
    s = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_ids.device).tril()
    return ~(same & causal)[:, None]


def _gpt(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):  # Megatron DDP / Float16Module
        module = module.module
    return module


def _uses_te(module: torch.nn.Module) -> bool:
    spec = getattr(_gpt(module), "agpo_spec", None)  # set by models/build.py
    return spec == "te" if spec is not None else cpu_platform.cuda_present()


@contextlib.contextmanager
def _rope_at(module: torch.nn.Module, position_ids: torch.Tensor):  # [R, S]
    """RoPE at `position_ids` instead of 0..S-1 for the duration of one local-spec forward.

    NOTE: GPTModel ignores position_ids under RoPE: it rotates by the row position 0..S-1. In a
    packed row that rotates a later sequence by its offset in the row; attention is relative, so
    only the rounding of cos/sin of larger angles changes, but that grows with the offset (fp32
    angles lose about offset x 6e-8 radians; tests/models/test_packing_parity.py sees it in the
    log-probs at offsets of tens). Restarting the positions gives every sequence the exact rotations
    it has alone: the rotary table of the row's length, gathered at `position_ids`, `[S, R, 1, D]`
    (it broadcasts over heads like the usual `[S, 1, 1, D]`; the local spec applies it to
    `[S, R, heads, D]` queries and keys). The THD path needs none of this: Megatron restarts the
    rotation at every `cu_seqlens` boundary itself.
    """
    rope = getattr(_gpt(module), "rotary_pos_emb", None)
    if rope is None:  # no RoPE module on this stage
        yield
        return
    table = rope(position_ids.shape[1])  # [S, 1, 1, D]
    emb = table[:, 0][position_ids.t()]  # [S, R, 1, D]
    rope.forward = lambda *args, **kwargs: emb  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del rope.forward


def _thd_params(mb: MicroBatch):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb["cu_seqlens"],
        cu_seqlens_kv=mb["cu_seqlens"],
        max_seqlen_q=mb["max_seqlen"],
        max_seqlen_kv=mb["max_seqlen"],
    )


def run_model(module: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """One forward of a (padded or packed) micro-batch on this stage; tensors already on the device.

    Padded: causal attention over `[B, S]`. Packed (`seq_ids` present, train/packing.py): THD with
    `cu_seqlens` on the Transformer Engine spec, the rows flattened to one `[1, R * S]` stream
    (the last stage's output is `[1, R * S, *]`: `forward_backward` reshapes it back); on the
    local spec a block-diagonal causal mask and RoPE restarted per sequence.
    """
    tokens = mb["tokens"]
    b, s = tokens.shape
    te = _uses_te(module)
    if "seq_ids" not in mb:
        # The local spec attends with the mask it is given (build.py sets AttnMaskType.arbitrary).
        mask = None if te else causal_mask(s, tokens.device)
        return module(tokens, torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1), mask)
    if te:
        return module(tokens.reshape(1, -1), mb["position_ids"].reshape(1, -1), None, packed_seq_params=_thd_params(mb))
    with _rope_at(module, mb["position_ids"]):
        return module(tokens, mb["position_ids"], packed_causal_mask(mb["seq_ids"]))


def vocab_parallel_logprobs(
    logits: torch.Tensor,  # [..., V/TP] this rank's vocab slice
    targets: torch.Tensor,  # [...] global token ids
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([...], [...] or None), fp32
    """log p(target) and entropy of softmax(logits / T) without gathering the vocabulary.

    The plain (unfused) path: it keeps an fp32 `[..., V/TP]` copy alive for backward; the fused
    op in `ops/fused_loss.py` is the memory-lean one and is checked against this.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    group = mpu.get_tensor_model_parallel_group()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    z = logits.float() / temperature
    # The max is only a shift for stability: no gradient needs to flow through it.
    zmax = z.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(zmax, op=torch.distributed.ReduceOp.MAX, group=group)
    z = z - zmax
    exp_z = z.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1))
    log_z = sum_exp.log()

    v_local = z.shape[-1]
    start = tp_rank * v_local
    local_t = targets - start
    in_slice = (local_t >= 0) & (local_t < v_local)
    picked = torch.gather(z, -1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target_z = reduce_from_tensor_model_parallel_region(torch.where(in_slice, picked, torch.zeros_like(picked)))
    logprobs = target_z - log_z

    entropy = None
    if with_entropy:
        # H = log Z - sum_v p_v z_v, with the sum split across TP ranks.
        p_z = reduce_from_tensor_model_parallel_region((exp_z * z).sum(dim=-1)) / sum_exp
        entropy = log_z - p_z
    return logprobs, entropy


def forward_backward(
    model: torch.nn.Module | list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    loss_fn: Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, Any]]],
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    """Run Megatron's schedule (1F1B when PP > 1) over micro-batches of equal shape.

    `loss_fn(logits [B, S, V/TP], mb) -> (loss, metrics)` runs on the last stage; the returned
    loss must already be normalised by the *global* token count (Megatron will not divide, see
    `calculate_per_token_loss` in models/build.py). Returns the metrics of each micro-batch on the
    last pipeline stage, and [] elsewhere. Micro-batches may be packed (train/packing.py): `loss_fn`
    then gets `[R, S, *]` outputs in the packed layout, and `mb["seq_ids"]` to find sequences.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    batch, seq_len = micro_batches[0]["tokens"].shape
    if len(chunks) > 1 or _pp_size() > 1:
        shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
        if len(shapes) > 1:
            raise ValueError(f"with pipeline parallelism all micro-batches need one shape, got {sorted(shapes)}")
    thd = "seq_ids" in micro_batches[0] and _uses_te(chunks[0])
    if thd:  # the stages exchange [R * S, 1, H] activations
        batch, seq_len = 1, batch * seq_len
    device = next(chunks[0].parameters()).device

    def step(data_iter, module):
        source = next(data_iter)  # the caller's dict: a routing record (models/routing.py) is kept in it
        mb = {k: v.to(device) if torch.is_tensor(v) else v for k, v in source.items()}
        b, s = mb["tokens"].shape
        control = routing.control_of(module)
        with contextlib.nullcontext() if control is None else control.micro_batch(source, thd):
            logits = run_model(module, mb)

        def loss_func(output: torch.Tensor):  # [B, S, *], or [1, B * S, *] from THD
            loss, metrics = loss_fn(output.reshape(b, s, -1) if thd else output, mb)
            return loss, torch.ones((), dtype=torch.int), metrics

        return logits, loss_func

    scope = contextlib.ExitStack()
    if not forward_only:
        config = chunks[0].config
        config.finalize_model_grads_func = _finalize_without_token_scaling
        if moe.is_moe(_gpt(chunks[0])):
            scope.enter_context(moe.aux_loss_scale(sum(mb["tokens"].numel() for mb in micro_batches)))
    with scope, cpu_platform.megatron_scope():
        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=batch,
            forward_only=forward_only,
        )
    return list(out)


def _pp_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_world_size()


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """DP/TP grad all-reduce without Megatron's divide-by-token-count: our loss is already
    normalised by the global count passed into it, which keeps DP=1 and DP=2 identical."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module | list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Forward-only log-probs of `mb["targets"]` per micro-batch: [{"logprobs": [B, S], "entropy": ...}].

    `chunk_tokens` set: the fused path (ops/fused_loss.py), which takes the output layer's input
    and never forms the `[B, S, V/TP]` logits; None: the plain reference path above.
    Only the last pipeline stage gets results (that is where the loss needs them).
    """
    from agpo_megatron.models.lm_head import capture_lm_head_input
    from agpo_megatron.ops.fused_loss import fused_logprobs_entropy

    chunks = model if isinstance(model, list) else [model]
    with contextlib.ExitStack() as stack:
        weight = stack.enter_context(capture_lm_head_input(chunks[-1])) if chunk_tokens else None

        def collect(out: torch.Tensor, mb: MicroBatch):  # out: hidden [B, S, H] (fused) or logits
            if chunk_tokens:
                lp, ent = fused_logprobs_entropy(
                    out,
                    mb["targets"],
                    weight=weight,
                    temperature=temperature,
                    chunk_tokens=chunk_tokens,
                    with_entropy=with_entropy,
                )
            else:
                lp, ent = vocab_parallel_logprobs(
                    out, mb["targets"], temperature=temperature, with_entropy=with_entropy
                )
            res = {"logprobs": lp.detach()}
            if ent is not None:
                res["entropy"] = ent.detach()
            return torch.zeros((), device=out.device), res

        return forward_backward(chunks, micro_batches, collect, forward_only=True)
