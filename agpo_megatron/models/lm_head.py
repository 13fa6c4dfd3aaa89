"""Output-layer surgery for the fused loss (ops/fused_loss.py): hand it the LM head's input.

`capture_lm_head_input` makes a last-stage Megatron `GPTModel` return the final hidden states
instead of the logits, and yields the output weight; `copy_to_tp_region` is the column-parallel
input mapping (identity forward, all-reduce of the gradient over TP backward) that the output
layer would have applied. docs/fused-loss.md explains why the fused loss needs both.

Departures from Megatron: `copy_to_tp_region` replaces `copy_to_tensor_model_parallel_region`,
which leaves a non-contiguous gradient unreduced (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from agpo_megatron.runtime.parallel import resolve_tp_group

__all__ = ["capture_lm_head_input", "copy_to_tp_region"]


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # A contiguous copy: the incoming gradient may be a transposed view, or shared.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tp_region(
    x: torch.Tensor,  # [..., H] replicated on the TP ranks
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:  # [..., H], the same values
    """Identity forward, all-reduce of the gradient over TP backward: wrap the hidden states fed
    to `fused_policy_loss_from_hidden` with it (unless they come from `capture_lm_head_input`).

    NOTE: Megatron's `copy_to_tensor_model_parallel_region` means the same, but its `_reduce`
    all-reduces `grad.contiguous()` and returns `grad`, so a non-contiguous gradient is silently
    left unreduced. GPTModel's `[S, B, *] -> [B, S, *]` transpose after the output layer produces
    exactly such a gradient (tests/ops/test_fused_loss.py caught it at TP=2).
    """
    group, _, tp_size = resolve_tp_group(tp_group)
    return x if tp_size == 1 else _CopyToTPRegion.apply(x, group)


@contextlib.contextmanager
def capture_lm_head_input(model: torch.nn.Module) -> Iterator[torch.Tensor | None]:
    """Make a last-stage Megatron `GPTModel` return its output layer's input; yields the weight.

    Inside the context, `model(tokens, position_ids, attention_mask)` returns the final hidden
    states (after the final norm) as `[B, S, H]` instead of logits `[B, S, V/TP]`: GPTModel
    transposes whatever its output layer returns from `[S, B, *]` to `[B, S, *]`, so the hidden
    states come back in the logits' layout (one `[B, S, H]` copy, small next to the logits).
    The yielded tensor is the output weight `[V/TP, H]`: the embedding matrix when embeddings are
    tied on a one-stage model, else `output_layer.weight`.

    The returned hidden states have already been through the column-parallel input mapping that
    the output layer would apply (`copy_to_tp_region`, or the sequence-parallel all-gather), so
    the backward of that mapping all-reduces (reduce-scatters) d_hidden over TP. The
    sequence-parallel branch is Megatron's own mapping and is not covered by the CPU tests.
    Feed them and the weight to `fused_policy_loss_from_hidden` / `fused_logprobs_entropy`.

    `model` is this rank's model chunk (the last one with virtual pipelining); wrappers with a
    `.module` (Megatron DDP, Float16Module) are unwrapped. On earlier pipeline stages, which have
    no output layer, it changes nothing and yields None, so a trainer can enter it on every rank
    around `forward_backward` and use the weight only in the last stage's loss function.
    """
    gpt = model
    while hasattr(gpt, "module"):
        gpt = gpt.module
    if not getattr(gpt, "post_process", False):
        yield None
        return
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if gpt.config.mtp_num_layers or gpt.config.defer_embedding_wgrad_compute:
        raise ValueError("capture_lm_head_input supports neither MTP nor deferred embedding wgrad")
    layer = gpt.output_layer
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight

    def forward(input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        # [S(/TP), B, H] -> [S, B, H], the mapping ColumnParallelLinear.forward applies.
        if layer.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, group=layer.tp_group), None
        return copy_to_tp_region(input_, layer.tp_group), None

    # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) is kept.
    layer.forward = forward
    try:
        yield weight
    finally:
        del layer.forward
