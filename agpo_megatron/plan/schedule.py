"""Step time of each placement and staleness, from per-phase times: the schedule they imply.

A projection, not a measurement: it takes phase times (measured, or given) of a colocated run on N
devices and rescales them to a disaggregated split of T trainer and R rollout devices (T + R = N):

    generation  gen(R) = gen_c x ((1 - tail) x N / R + tail)
                (the throughput-bound part scales with the replicas; `tail`, the share of the
                colocated generation spent waiting on the longest responses, does not)
    training    train(T) = train_c x N / T          (data-parallel, linear)

and puts them into each loop's schedule (train/trainer.py, train/async_loop.py):

    colocated, synchronous      gen_c + reward + train_c + sync_c + handover
    disaggregated, staleness 0  gen(R) + reward + train(T) + sync_d
    disaggregated, staleness s  max(gen(R), reward + train(T)) + sync_d       (s >= 1)

(`sides_step` is that schedule fed each side's own measured times, with no rescaling;
`sides_step_samples` feeds it their per-step distributions.)

At s >= 1 the loop keeps one request in flight (rollout/remote.py carries one conversation at a
time), so a deeper queue changes the data's age, not the step time: with deterministic phase times
s = 2 projects the same as s = 1. What it leaves out: the memory a disaggregated side no longer
shares (a larger KV cache or micro-batch on its own devices), and anything that varies step to step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PhaseTimes:
    """Seconds per RL step of a colocated synchronous run on `devices` devices."""

    devices: int
    """N: the devices the colocated run uses (the disaggregated split divides the same N)."""
    generate: float
    """vLLM generation of one step's batch on all N devices."""
    reward: float
    """Answer checking (CPU)."""
    train: float
    """Old/reference log-probs and the update, on all N devices."""
    sync: float
    """Weight sync into the colocated engines."""
    handover: float = 0.0
    """Colocated memory hand-overs (sleep, wake, offload, reload): what disaggregation removes."""
    tail: float = 0.0
    """Share of `generate` spent on the longest responses alone (does not shrink with more replicas)."""

    def __post_init__(self) -> None:
        if self.devices < 2:
            raise ValueError(f"devices must be >= 2 to split, got {self.devices}")
        if not 0 <= self.tail <= 1:
            raise ValueError(f"tail must be in [0, 1], got {self.tail}")
        if min(self.generate, self.reward, self.train, self.sync, self.handover) < 0:
            raise ValueError("phase times must be >= 0")


def colocated_step(t: PhaseTimes) -> float:
    """Seconds per step, colocated and synchronous."""
    return t.generate + t.reward + t.train + t.sync + t.handover


def disaggregated_step(t: PhaseTimes, *, rollout_devices: int, staleness: int, sync: float | None = None) -> float:
    """Seconds per step with `rollout_devices` of the N rolling out and the rest training.

    `sync`: the trainer -> rollout weight sync (None: the colocated sync's time)."""
    R = rollout_devices
    T = t.devices - R
    if not 1 <= R < t.devices:
        raise ValueError(f"rollout_devices must be in [1, {t.devices}), got {R}")
    gen = t.generate * ((1 - t.tail) * t.devices / R + t.tail)
    train = t.train * t.devices / T
    return sides_step(
        generate=gen, reward=t.reward, train=train, sync=t.sync if sync is None else sync, staleness=staleness
    )


def sides_step(*, generate: float, reward: float, train: float, sync: float, staleness: int) -> float:
    """Seconds per disaggregated step from each side's own phase times (generation on the rollout
    devices, log-probs + update on the trainer devices, the weight sync between them): the schedule
    alone, with no rescaling. Where the sides were measured as they are (a staleness-0 run of the same
    split), this checks the schedule without the device-count model `disaggregated_step` adds."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if staleness == 0:
        return generate + reward + train + sync
    return max(generate, reward + train) + sync


def speedups(
    t: PhaseTimes, *, rollout_devices: int, stalenesses: tuple[int, ...] = (0, 1, 2), sync: float | None = None
) -> dict[int, float]:
    """Colocated step time over the disaggregated one, per staleness."""
    base = colocated_step(t)
    return {
        s: base / disaggregated_step(t, rollout_devices=rollout_devices, staleness=s, sync=sync) for s in stalenesses
    }


def sides_step_samples(*, generate: list[float], train: list[float], sync: float, staleness: int) -> float:
    """Median seconds per disaggregated step from each side's per-step times, measured (`generate`:
    generation of a step's batch; `train`: reward + log-probs + update), paired every way.

    NOTE: once the sides overlap (staleness >= 1), a step takes the longer of two phases that vary
    from step to step, and the median of that max is above the max of the medians that `sides_step`
    takes: fixed phase times predict an overlapped step too fast. The two sides then run
    independently, so every generation time is paired with every training time."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if not generate or not train:
        raise ValueError("generate and train need at least one measured step each")
    join = (lambda g, t: g + t) if staleness == 0 else max
    steps = sorted(join(g, t) + sync for g in generate for t in train)
    mid = len(steps) // 2
    return steps[mid] if len(steps) % 2 else (steps[mid - 1] + steps[mid]) / 2
