"""One reward per sample, on every rank: each rank scores a share of the batch, an all-gather shares the verdicts.

Every rank holds the whole global batch of responses (the rollout gathers it), and the advantages
are computed redundantly everywhere. Scoring redundantly too would be wrong, not just slow: a
check that finishes near its deadline can pass on one rank and time out on another, and then the
tensor-parallel ranks of one sequence train it with different advantages. So rank `r` scores
samples `r, r + W, r + 2W, ...` (strided, so that one prompt's hard group is spread over the
ranks) and an all-gather gives every rank the same verdicts, bit for bit; the metrics are computed
from the gathered verdicts, so they agree too. Each rank checks `N / W` answers, which divides
the reward time by the world size `W`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from agpo_megatron.data.answer_match import RewardResult, reward_metrics, score_many
from agpo_megatron.runtime.parallel import comm_device

__all__ = ["score_distributed"]

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[RewardResult]]


def score_distributed(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
    budget_s: float | None = None,
    group: dist.ProcessGroup | None = None,
    score_fn: ScoreFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score the same `responses` (all ranks of `group` pass the same lists) once, share the verdicts.

    `responses` and `golds` are the whole batch, identical on every rank. `timeout_s` and
    `budget_s` are the per-check deadline and per-call budget of this rank's share
    (`answer_match.score_many`); the ranks run concurrently. `group`: the ranks that share the
    work (default: the world); without an initialised process group, or in a world of one,
    everything is scored here. `score_fn(responses, golds) -> list[RewardResult]` scores this
    rank's share (default: `score_many` with `timeout_s` / `budget_s`; a hook for tests).

    Returns `r_acc` (float32 `[N]`), `formatted` (bool `[N]`) and the metrics (`reward_metrics`),
    the same on every rank.
    """
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} golds")
    if score_fn is None:

        def score_fn(r: Sequence[str], g: Sequence[str]) -> list[RewardResult]:
            return score_many(r, g, timeout_s=timeout_s, budget_s=budget_s)

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    n = len(responses)
    mine = score_fn(responses[rank::world], golds[rank::world])
    if len(mine) != len(range(rank, n, world)):
        raise ValueError(f"score_fn returned {len(mine)} results for {len(range(rank, n, world))} responses")

    # Columns: correct, formatted, timed_out. Padded to the largest share so all shards are equal.
    per_rank = -(-n // world)
    device = comm_device(group) if world > 1 else torch.device("cpu")
    local = torch.zeros(per_rank, 3, dtype=torch.uint8, device=device)  # [ceil(N/W), 3]
    if mine:
        local[: len(mine)] = torch.tensor([[r.correct, r.formatted, r.timed_out] for r in mine], dtype=torch.uint8)
    if world > 1:
        shards = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(shards, local, group=group)
        gathered = torch.stack(shards, dim=1).cpu()  # [ceil(N/W), W, 3]: row i holds samples i*W .. i*W+W-1
    else:
        gathered = local.cpu().unsqueeze(1)
    flags = gathered.reshape(-1, 3)[:n].bool()  # [N, 3] in sample order (strided shares interleave back)
    correct, formatted, timed_out = flags.unbind(dim=1)
    metrics = reward_metrics(correct.tolist(), formatted.tolist(), timed_out.tolist())
    return correct.float(), formatted, metrics
