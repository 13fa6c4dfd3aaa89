"""Engine-agnostic SPMD rollout plumbing: replica layout, prompt split, request seeds, gather.

Any colocated engine that runs one instance per rank inside the training world (vLLM's
`external_launcher` today; an SGLang engine or a test double could reuse this) is organised the
same way.

Layout. The world of W ranks holds W / rollout_tp independent *replicas*, TP innermost (as vLLM
builds its groups): ranks [r*tp, (r+1)*tp) form replica r. Ranks of one replica must see
identical requests (same prompts, same seeds, same order), because each runs its own scheduler
and they only agree if scheduling and sampling are deterministic. Replicas share nothing while
they generate.

Prompts and seeds. `generate()` takes the *global* prompt list on every rank. Replica r
generates the r-th contiguous chunk (`split_prompts`), and every prompt gets a seed derived from
(sampling.seed, its global index), never from the replica (`request_seed`). So all ranks of a
replica agree, the replicas sample independently, and the samples do not depend on rollout_tp.
The completions come back to every rank through `all_gather_object` over the world
(`gather_completions`): a pickle of token lists, cheap next to generation. NOTE: unseeded requests
would draw from the process-global torch RNG, which Megatron advances differently on different TP
ranks; the ranks of a replica would then sample different tokens and their schedulers would
diverge. Hence a seed on every request.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

from agpo_megatron.rollout.base import Completion

SEED_MOD = 2**31
"""Request seeds stay below 2**31: vLLM's CPU sampler draws per-token seeds in [0, 2**31)."""
_SEED_STRIDE = 1_000_003
"""Spacing between the seed spaces of consecutive `SamplingConfig.seed` values (a prime, so
nearby steps and prompt indices do not line up)."""


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    """This rank's place among the rollout replicas (TP innermost, as vLLM builds its groups)."""

    replica: int
    """Which replica (vLLM external-DP rank) this rank belongs to."""
    num_replicas: int
    """world_size / rollout_tp."""
    tp_rank: int
    """Rank inside the replica's TP group."""
    tp: int
    """rollout_tp."""

    @classmethod
    def of_rank(cls, rank: int, world_size: int, rollout_tp: int) -> ReplicaLayout:
        if rollout_tp < 1 or world_size % rollout_tp:
            raise ValueError(f"rollout_tp={rollout_tp} must be >= 1 and divide the world size {world_size}")
        return cls(
            replica=rank // rollout_tp, num_replicas=world_size // rollout_tp, tp_rank=rank % rollout_tp, tp=rollout_tp
        )


def split_prompts(num_prompts: int, num_replicas: int) -> list[range]:
    """Contiguous, near-equal chunks of the global prompt indices, one per replica.

    The first `num_prompts % num_replicas` replicas take one extra prompt; a replica may get an
    empty range when there are fewer prompts than replicas.
    """
    base, extra = divmod(num_prompts, num_replicas)
    bounds = [0]
    for r in range(num_replicas):
        bounds.append(bounds[-1] + base + (r < extra))
    return [range(bounds[r], bounds[r + 1]) for r in range(num_replicas)]


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """The seed of one prompt's request; vLLM gives its j-th sample `request_seed + j`.

    Within one call, prompts' seed ranges [s, s + n) do not overlap (indices are spaced by n).
    """
    return (seed * _SEED_STRIDE + prompt_index * n) % SEED_MOD


def gather_completions(local: list[list[Completion]], layout: ReplicaLayout) -> list[list[Completion]]:
    """Every rank gets the global list: each replica's chunk, in replica (= prompt) order.

    Only TP-rank 0 of each replica contributes (its TP peers hold identical results).
    NOTE: `all_gather_object` pickles over the default group (gloo on CPU; on NCCL it stages
    the bytes through the current CUDA device). Token-id lists are small next to generation
    cost; if that ever changes, gather padded id tensors instead.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if layout.tp_rank == 0 else None)
    out: list[list[Completion]] = []
    for r in range(layout.num_replicas):
        out.extend(gathered[r * layout.tp])
    return out
