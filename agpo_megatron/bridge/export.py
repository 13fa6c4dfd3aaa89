"""TP/PP-sharded Megatron model -> full HF tensors, streamed in byte-bounded buckets.

Every rank runs the same loop over `names.param_rules(arch, spec)`, in that fixed (HF checkpoint)
order, so the collectives line up without any name or shape exchange:

1. The owning pipeline stage (`names.stage_of`) all-gathers the parameter's TP shards in its TP
   group and `names.unshard`s them into the full Megatron tensor. Replicated tensors (norms)
   need no gather.
2. With PP > 1 the owner broadcasts the full tensor to the other stages over the PP group; the
   receivers allocate it from `names.full_shape`, known on every rank.
3. `names.megatron_to_hf` splits it into HF tensors (q/k/v, gate/up), which are yielded.

MoE (issue 23): a routed expert's weight lives on one expert-parallel (EP) rank of the owning
stage, split over its expert-tensor-parallel (ETP) group. That rank's ETP group gathers it, and it
broadcasts the full tensor over the EP group before the PP broadcast; the router is replicated.

So every rank ends up with every full HF tensor: what a colocated vLLM needs, whatever its own
TP layout (each vLLM rank slices its shard out of the full tensor). Tied embeddings export no
lm_head (the HF config ties it); with PP > 1 the last stage's `output_layer.weight` is
Megatron's copy of the embedding and is skipped (there is no rule for it).

Memory: a bucket holds at most `bucket_bytes` of HF tensors (or a single larger tensor); on top
of it one parameter is in flight: its TP shards plus their concatenation, and for q/k/v their
contiguous copies (about 3x the full tensor at worst). Nothing scales with the model size.
NOTE: at TP=1 without a dtype cast, yielded tensors may share memory with the live parameters;
consume them before the next optimizer step.

Only one model chunk per rank (no virtual pipeline stages). `sync_weights` pushes the stream
into a `RolloutEngine`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from agpo_megatron.bridge import names
from agpo_megatron.bridge.hf_io import spec_of
from agpo_megatron.models.hf_config import ModelArch
from agpo_megatron.runtime.nonfinite import check_finite_weights

if TYPE_CHECKING:
    from agpo_megatron.rollout.base import RolloutEngine

DEFAULT_BUCKET_BYTES = 512 * 2**20

HFTensor = tuple[str, torch.Tensor]


def _single_chunk(model_chunks: torch.nn.Module | list[torch.nn.Module]) -> torch.nn.Module:
    """The bare GPTModel of this rank: DDP / Float16Module wrappers removed."""
    from megatron.core.utils import unwrap_model

    chunks = unwrap_model(model_chunks if isinstance(model_chunks, list) else [model_chunks])
    if len(chunks) != 1:
        raise NotImplementedError(
            f"weight export supports one model chunk per rank, got {len(chunks)} "
            "(virtual pipeline stages are not supported)"
        )
    return chunks[0]


@torch.no_grad()
def iter_hf_tensors(
    model_chunks: torch.nn.Module | list[torch.nn.Module], arch: ModelArch, *, dtype: torch.dtype | None = None
) -> Iterator[HFTensor]:
    """Every full HF tensor of the model, in `param_rules` order, on every rank (collective).

    `dtype` casts before any communication (fewer bytes when the consumer wants bf16 from an
    fp32 model); None keeps the parameters' dtype.
    """
    from megatron.core import parallel_state as mpu

    model = _single_chunk(model_chunks)
    params = dict(model.named_parameters())
    first = next(iter(params.values()))
    out_dtype = dtype or first.dtype  # Megatron builds every parameter in params_dtype
    device = first.device
    tp, pp = mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    tp_group = mpu.get_tensor_model_parallel_group()
    pp_group = mpu.get_pipeline_model_parallel_group() if pp > 1 else None
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else [dist.get_rank()]  # global rank per stage
    offset = names.layer_range(arch, pp_rank, pp).start

    ep, ep_rank = mpu.get_expert_model_parallel_world_size(), mpu.get_expert_model_parallel_rank()
    etp, etp_group = mpu.get_expert_tensor_parallel_world_size(), mpu.get_expert_tensor_parallel_group()
    ep_group = mpu.get_expert_model_parallel_group() if ep > 1 else None
    ep_ranks = dist.get_process_group_ranks(ep_group) if ep > 1 else [dist.get_rank()]  # global rank per EP rank
    first_expert = names.expert_offset(arch, ep_rank, ep)

    for rule in names.param_rules(arch, spec_of(model)):
        owner = names.stage_of(rule, arch, pp)[0]
        expert_owner = names.ep_owner(rule, arch, ep)  # None: not a routed expert's weight
        if pp_rank == owner and expert_owner in (None, ep_rank):
            local_name = names.to_local_name(rule.megatron, offset, first_expert)
            if local_name not in params:
                raise KeyError(f"stage {pp_rank} should hold {rule.megatron} (local {local_name!r}) but does not")
            local = params[local_name].detach().to(out_dtype)
            group, size = (etp_group, etp) if rule.expert is not None else (tp_group, tp)
            if rule.tp_dim is not None and size > 1:
                shards = [torch.empty_like(local) for _ in range(size)]
                dist.all_gather(shards, local.contiguous(), group=group)
                full = names.unshard(rule, shards)
            else:
                full = local
        else:
            full = torch.empty(names.full_shape(rule, arch), dtype=out_dtype, device=device)
        if pp_rank == owner and expert_owner is not None and ep > 1:
            # The owning EP rank (after its ETP gather) sends the expert to the rest of its EP group.
            full = full.contiguous()
            dist.broadcast(full, src=ep_ranks[expert_owner], group=ep_group)
        if pp > 1:
            full = full.contiguous()
            dist.broadcast(full, src=pp_ranks[owner], group=pp_group)
        for hf_name, t in zip(rule.hf, names.megatron_to_hf(rule, full, arch), strict=True):
            # q/k/v are strided views into the grouped tensor: copy them so that each yielded
            # tensor owns plain memory (vLLM, safetensors and byte accounting all expect that).
            yield hf_name, t.contiguous()


def iter_hf_buckets(
    model_chunks: torch.nn.Module | list[torch.nn.Module],
    arch: ModelArch,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[list[HFTensor]]:
    """`iter_hf_tensors` grouped into lists of at most `bucket_bytes` bytes (collective).

    A tensor larger than `bucket_bytes` travels alone in its own bucket. The next bucket is
    only gathered when the consumer asks for it, so peak memory is one bucket (plus the
    parameter in flight), not the model.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[HFTensor] = []
    size = 0
    for name, t in iter_hf_tensors(model_chunks, arch, dtype=dtype):
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


@dataclasses.dataclass(frozen=True)
class SyncStats:
    """What one `sync_weights` moved, for logging."""

    tensors: int
    """HF tensors handed to the engine."""
    bytes: int
    """Their total size."""
    buckets: int
    """Buckets gathered."""
    seconds: float
    """Wall time of gather + engine load, on this rank."""


def sync_weights(
    model_chunks: torch.nn.Module | list[torch.nn.Module],
    arch: ModelArch,
    engine: RolloutEngine,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
    version: int | None = None,
) -> SyncStats:
    """Push the actor's current weights into `engine` (collective: call on every rank).

    `version`: the trainer step these weights come from, recorded as the engine's `weights_version`
    (every completion it samples then carries it).

    The buckets are flattened into one lazy iterator and given to a single
    `engine.update_weights` call (vLLM needs every tensor of a module in the same reload call,
    and byte buckets do not follow module boundaries; see `VLLMEngine.update_weights`). The
    engine pulls tensor by tensor; each is dropped from its bucket as it is handed over, so
    what stays alive is the unconsumed rest of one bucket.
    """
    # vLLM must never serve non-finite weights (issue 11): refuse before anything is sent.
    check_finite_weights(_single_chunk(model_chunks).named_parameters(), "the weight sync to the rollout engine")
    counts = {"tensors": 0, "bytes": 0, "buckets": 0}

    def stream() -> Iterator[HFTensor]:
        for bucket in iter_hf_buckets(model_chunks, arch, bucket_bytes=bucket_bytes, dtype=dtype):
            counts["buckets"] += 1
            bucket.reverse()
            while bucket:
                name, t = bucket.pop()
                counts["tensors"] += 1
                counts["bytes"] += t.numel() * t.element_size()
                yield name, t

    start = time.perf_counter()
    if version is not None:
        engine.weights_version = version  # type: ignore[attr-defined]  # before: a remote engine sends it along
    it = stream()
    engine.update_weights(it)
    # NOTE: the stream runs collectives, so every rank must pull it to the end. An engine that
    # stopped early would leave the ranks out of step (a hang at the next collective), so finish
    # the stream here and fail loudly instead: the engine did not get all weights.
    leftover = sum(1 for _ in it)
    if leftover:
        raise RuntimeError(
            f"the rollout engine consumed only {counts['tensors'] - leftover} of {counts['tensors']} weight tensors"
        )
    return SyncStats(seconds=time.perf_counter() - start, **counts)
