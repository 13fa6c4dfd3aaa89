"""Routing replay for mixture-of-experts training (`algo.routing_replay`, issue 23): make a training
forward route every token to the experts recorded in an earlier forward, and measure how often the
routing would differ.

Why: the policy ratio compares the trainer's log-prob with the proximal (old) one. In an MoE the
router's top-k is a discontinuous function of the weights and of numerics, so two forwards of the
same tokens can send a token to different experts, and the ratio then measures the routing change
as much as the policy change. Replaying the recorded top-k keeps the expert choice fixed; the
gradient still flows through the router's probabilities of the recorded experts (the same
choice as Megatron's own RouterReplay, and as R2/R3 in verl, NeMo-RL and slime).

Mechanism: every Megatron `TopKRouter` calls `router.router_replay.get_replay_topk(scores, topk,
..., default_compute_topk)` when that attribute is set (megatron-core 0.16-0.19,
`topk_routing_with_score_function`). `RoutingControl.install` sets one `_RouterHook` per router;
the hook records the top-k it computes, or substitutes the recorded one (`scores.gather` at the
recorded indices: for `pre_softmax=False` the softmax over those k logits is the renormalised
probability, as with free routing). Unlike Megatron's RouterReplay, nothing is global: each model
(actor, reference) has its own hooks, and the records travel with the micro-batch they belong to.

Records are per micro-batch and per MoE layer, `{layer: [B, S, K]}` in `mb["routed_experts"]`
(global 0-based layer index; token positions as in `mb["tokens"]`, packed or padded; -1 = no record,
that token routes freely). A pipeline stage's hooks read and write only its own layers' entries.
The router sees tokens in its own order: `[S * B]` sequence-major on the padded/local-packed path,
`[B * S]` on the THD path.

Where the records come from (`algo.routing_replay`, `train/policy.py::Actor`):
- r2: the old-log-prob forward records (`record`), the update replays;
- r3: the rollout engine's routing, per sequence in `Sequences.routed_experts` (`[n, L, K]`, vLLM's
  `CompletionOutput.routed_experts`), placed into the micro-batches by train/batch.py and
  train/packing.py as `rollout_logprobs` are; both the old-log-prob forward and the update replay it.

Departures / limits: not with activation recompute (the recomputed forward would route afresh) or
sequence parallelism (the router sees a sequence shard); config validation refuses both.
`routing_mismatch` counts (response token, MoE layer) pairs whose expert *set* differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist

Mode = Literal["free", "record", "replay", "compare"]
"""free: Megatron's routing; record: route freely and store the top-k in the micro-batch;
replay: route as the micro-batch's record says; compare: route freely, count differences."""


class _RouterHook:
    """Megatron's `router_replay` hook of one router (one MoE layer)."""

    def __init__(self) -> None:
        self.mode: Mode = "free"
        self.recorded: torch.Tensor | None = None  # [T, K] router order
        self.target: torch.Tensor | None = None  # [T, K] router order
        self.mask: torch.Tensor | None = None  # [T] bool: tokens the mismatch counts
        self.differ = 0
        self.counted = 0

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, idx = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.mode == "record":
            self.recorded = idx.detach()
            return probs, idx
        if self.mode in ("replay", "compare"):
            target = self.target.to(idx.device, idx.dtype)  # records are int32; Megatron's top-k indices int64
            if target.shape != idx.shape:
                raise RuntimeError(f"routing replay: record {tuple(target.shape)} for router top-k {tuple(idx.shape)}")
            # -1: no record for this token (padding, a position the engine never routed): free routing.
            recorded = (target >= 0).all(-1)  # [T]
            target = torch.where(recorded[:, None], target, idx)
            differs = (idx.detach().sort(-1).values != target.sort(-1).values).any(-1)  # [T]
            mask = self.mask.to(idx.device) & recorded
            self.differ += int((differs & mask).sum())
            self.counted += int(mask.sum())
            if self.mode == "replay":
                return scores.gather(1, target), target
        return probs, idx


def _to_router(x: torch.Tensor, thd: bool) -> torch.Tensor:  # [B, S, *] -> [T, *]
    return x.reshape(-1, *x.shape[2:]) if thd else x.transpose(0, 1).reshape(-1, *x.shape[2:])


def _from_router(x: torch.Tensor, b: int, s: int, thd: bool) -> torch.Tensor:  # [T, *] -> [B, S, *]
    return x.reshape(b, s, *x.shape[1:]) if thd else x.reshape(s, b, *x.shape[1:]).transpose(0, 1).contiguous()


class RoutingControl:
    """The routing hooks of one model chunk and the mode they run in."""

    def __init__(self, hooks: dict[int, _RouterHook]):
        self.hooks = hooks  # global 0-based layer index -> hook
        self.mode: Mode = "free"

    @classmethod
    def install(cls, model: torch.nn.Module) -> RoutingControl:
        """Hook every MoE router of `model` (a GPTModel stage); no routers: an inert control."""
        from megatron.core.transformer.moe.router import TopKRouter

        hooks = {}
        for module in model.modules():
            if isinstance(module, TopKRouter):
                hook = _RouterHook()
                module.router_replay = hook
                hooks[module.layer_number - 1] = hook  # Megatron's layer_number: global, 1-based
        return cls(hooks)

    @contextlib.contextmanager
    def using(self, mode: Mode) -> Iterator[None]:
        """Within: forwards run in `mode` (see `Mode`)."""
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def micro_batch(self, mb: dict, thd: bool) -> Iterator[None]:
        """Around one forward of micro-batch `mb` (the caller's own dict, where a record is kept)."""
        record = mb.get("routed_experts")
        mode = self.mode
        if not self.hooks or mode == "free" or (mode in ("replay", "compare") and record is None):
            yield  # e.g. the on-policy update, which had no separate old-log-prob forward to record
            return
        b, s = mb["tokens"].shape
        mask = mb.get("loss_mask")
        mask = torch.ones(b, s, dtype=torch.bool) if mask is None else mask.bool()
        for layer, hook in self.hooks.items():
            hook.mode = mode
            if mode != "record":
                hook.target = _to_router(record[layer], thd)
                hook.mask = _to_router(mask, thd)
        try:
            yield
        finally:
            for hook in self.hooks.values():
                hook.mode, hook.target, hook.mask = "free", None, None
        if mode == "record":
            mb["routed_experts"] = {
                layer: _from_router(hook.recorded, b, s, thd).to(torch.int32) for layer, hook in self.hooks.items()
            }
            for hook in self.hooks.values():
                hook.recorded = None

    def reset_counts(self) -> None:
        """Forget the mismatch counted so far (local, no collective)."""
        for h in self.hooks.values():
            h.differ = h.counted = 0

    def pop_mismatch(self, count_here: bool) -> float | None:
        """Fraction of (response token, MoE layer) pairs routed differently from their record since
        the last call, over all ranks (collective); None when nothing was compared. `count_here`:
        whether this rank's counts are distinct data (tp_rank 0: TP ranks see the same tokens)."""
        from agpo_megatron.runtime.parallel import comm_device

        vec = torch.zeros(2, dtype=torch.float64, device=comm_device())
        if count_here:
            vec[0] = sum(h.differ for h in self.hooks.values())
            vec[1] = sum(h.counted for h in self.hooks.values())
        self.reset_counts()
        dist.all_reduce(vec)
        return float(vec[0] / vec[1]) if vec[1] > 0 else None


def control_of(module: torch.nn.Module) -> RoutingControl | None:
    """The `RoutingControl` installed on a model chunk (DDP/Float16Module unwrapped), if any."""
    while hasattr(module, "module"):
        module = module.module
    return getattr(module, "agpo_routing", None)
