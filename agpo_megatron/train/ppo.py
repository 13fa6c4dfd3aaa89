"""PPO mini-batches: the old / reference log-probs of a rollout, then its optimizer steps.

A rollout of P prompts x G responses is cut into P / batch.prompts_per_update mini-batches of whole
prompt groups (train/batch.py::split_mini_batches), each one optimizer step, all repeated algo.ppo_epochs
times. The old log-probs (the policy that sampled) and the reference's are computed once per rollout,
before the first update. Update 1 runs at the weights that sampled the rollout: its ratio is exactly
1 and it is the only one where the clip cannot act; updates 2.. are off-policy, and their approx_kl
is what measures how far an update moves the policy (the adaptive clip's input).

On-policy shortcut (rollout.logprob_mode recompute): update 1's old log-probs are its own forward
pass's, detached (`Actor.policy_step(on_policy=True)`), so its mini-batch needs no separate forward.
With one update per rollout that removes the actor's log-prob pass altogether; the gradient is the
same bit for bit (tests/workers/ppo_updates.py).

Departures: mini-batches are contiguous slices of the rollout, the same ones every epoch (the sampler
already shuffles prompts; VeRL optionally reshuffles per epoch). With algo.ppo_epochs > 1 the first
mini-batch's old log-probs are computed too: epoch 2 needs them after the weights have moved.
"""

from __future__ import annotations

import contextlib
from typing import Any

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.train.batch import MiniBatch

# Summed or current-state metrics: the last update's value is the rollout's, not the mean.
_LAST = ("nonfinite_steps_total", "lr")


def _shortcut(index: int, mode: str, epochs: int) -> bool:
    """Whether update `index` (0-based over the rollout's mini-batches) of epoch 1 takes its old
    log-probs from its own forward pass: the first, when nothing reads them again later."""
    return mode == "recompute" and index == 0 and epochs == 1


def attach_logprobs(actor, reference, minis: list[MiniBatch], *, mode: str, epochs: int, temperature: float) -> None:
    """Set "old_logprobs" (and "ref_logprobs" with a reference) on every micro-batch, once per rollout.

    An offloaded Reference comes to the device once for all the mini-batches (issue 18: it made a
    round trip per mini-batch)."""
    with contextlib.nullcontext() if reference is None else reference.resident():
        for i, mini in enumerate(minis):
            mbs = mini.micro_batches
            if mode == "rollout":
                for mb in mbs:
                    mb["old_logprobs"] = mb["rollout_logprobs"]
            elif not _shortcut(i, mode, epochs):
                for mb, out in zip(mbs, actor.logprobs(mbs, temperature=temperature)):
                    mb["old_logprobs"] = out["logprobs"]
            if reference is not None:
                for mb, out in zip(mbs, reference.logprobs(mbs, temperature=temperature)):
                    mb["ref_logprobs"] = out["logprobs"]


def update(
    actor, minis: list[MiniBatch], loss_cfg: PolicyLossConfig, *, mode: str, epochs: int, **step: Any
) -> dict[str, float]:
    """All optimizer steps of one rollout; returns `summarize` of their metrics.

    `step`: `Actor.policy_step`'s temperature, kl_coef and eps (fixed over the rollout: the
    controllers update once per rollout)."""
    per_update = []
    for epoch in range(epochs):
        for i, mini in enumerate(minis):
            per_update.append(
                actor.policy_step(
                    mini.micro_batches,
                    loss_cfg,
                    global_num_tokens=mini.num_tokens,
                    global_num_seqs=mini.num_seqs,
                    on_policy=epoch == 0 and _shortcut(i, mode, epochs),
                    **step,
                )
            )
    return summarize(per_update)


def summarize(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One row per rollout from the metrics of its updates.

    Every key: the mean over updates (lr and nonfinite_steps_total: the last update's; `*_max` the
    largest and `*_min` the smallest over updates, as within one update). Plus
    `num_updates`, `pg_clipfrac_last_update` / `approx_kl_last_update` (the last update's, the most
    off-policy), and with 2+ updates `approx_kl_off_policy`: the mean approx_kl of updates 2.., the
    ones not at the sampling weights (update 1's is 0, or the engine mismatch with logprob_mode rollout).
    No updates: `num_updates` 0 alone.
    """
    if not per_update:  # a dynamic-sampling step that found no group to train (train/rollout_rounds.py)
        return {"num_updates": 0.0}
    keys = sorted({k for m in per_update for k in m})
    row = {}
    for k in keys:
        vals = [m[k] for m in per_update if k in m]
        if k in _LAST:
            row[k] = per_update[-1].get(k, 0.0)
        elif k.endswith("_max"):
            row[k] = max(vals)
        elif k.endswith("_min"):
            row[k] = min(vals)
        else:
            row[k] = sum(m.get(k, 0.0) for m in per_update) / len(per_update)
    row["num_updates"] = float(len(per_update))
    for k in ("pg_clipfrac", "approx_kl"):
        if k in per_update[-1]:
            row[f"{k}_last_update"] = per_update[-1][k]
    if len(per_update) > 1:
        row["approx_kl_off_policy"] = sum(m.get("approx_kl", 0.0) for m in per_update[1:]) / (len(per_update) - 1)
    return row
