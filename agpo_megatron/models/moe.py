"""Mixture-of-experts around Megatron's MoE layer: the load-balancing loss's scale and its metric.

The router's auxiliary loss (Switch-style, `model.moe_aux_loss_coef`) reaches the gradient through
Megatron's `MoEAuxLossAutoScaler`, whose backward multiplies it by a scale the schedule sets at
every micro-batch. With `calculate_per_token_loss` (models/build.py), Megatron multiplies each
micro-batch's aux loss by its token count and expects `finalize_model_grads` to divide every
gradient by the global token count. Our policy loss is already divided by the global count
(algo/loss.py) and our finalize does not divide (models/forward.py), so without a correction the
aux gradient would grow with the micro-batch size, the number of micro-batches and the DP size.
`aux_loss_scale` sets the scale to 1 / (tokens of all micro-batches on all DP ranks), which makes
the aux gradient the mean over micro-batches and DP ranks of `coef * aux_loss` (what Megatron
intends), independent of the layout. Exact with sequence parallelism off (with it, Megatron counts
each TP rank's sequence shard as its tokens, as its own finalize does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

AUX_LOSS_NAME = "load_balancing_loss"
"""The name Megatron's router tracks the aux loss under (`aux_loss` load balancing)."""


def is_moe(module: torch.nn.Module) -> bool:
    return getattr(getattr(module, "config", None), "num_moe_experts", None) is not None


@contextlib.contextmanager
def aux_loss_scale(local_tokens: int) -> Iterator[None]:
    """Within: the schedule's aux-loss scale is divided by the global token count (collective).

    `local_tokens`: tokens of all this rank's micro-batches (`B * S` each, padding included: what
    the router counts). The fp16 loss scale the schedule passes is kept as a factor.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from agpo_megatron.runtime.parallel import comm_device

    group = mpu.get_data_parallel_group()
    total = torch.tensor([float(local_tokens)], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(total, group=group)
    factor = 1.0 / max(float(total.item()), 1.0)
    original = MoEAuxLossAutoScaler.set_loss_scale

    def scaled(scale: torch.Tensor) -> None:
        original(scale * factor)

    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(scaled)  # type: ignore[method-assign]
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.set_loss_scale = staticmethod(original)  # type: ignore[method-assign]


def pop_aux_loss(num_layers: int, num_microbatches: int) -> float:
    """The step's load-balancing loss (unweighted by the coefficient), mean over layers, micro-batches
    and ranks, on every rank (collective: call it on every rank of an MoE model). Clears the tracker.

    Each rank's tracker holds, per layer of its pipeline stage, the sum over its micro-batches;
    other stages' layers are zero. The world sum therefore counts every layer once per TP x DP rank.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from agpo_megatron.runtime.parallel import comm_device

    tracker = get_moe_layer_wise_logging_tracker()
    vec = torch.zeros(1, dtype=torch.float64, device=comm_device())
    if AUX_LOSS_NAME in tracker:  # absent with model.moe_aux_loss_coef=0
        vec += tracker[AUX_LOSS_NAME]["values"].sum().to(vec)
    dist.all_reduce(vec)
    clear_aux_losses_tracker()
    replicas = dist.get_world_size() // mpu.get_pipeline_model_parallel_world_size()
    return float(vec.item()) / (num_layers * max(num_microbatches, 1) * replicas)
