"""The projection for GPUs: colocated vs disaggregated step time at staleness 0/1/2 (plan/schedule.py).

    python benchmarks/async_model.py                      # the 7B, 8 x H100 example below
    python benchmarks/async_model.py --generate 120 --train 50 --sync 3 --handover 6 --tail 0.3

It feeds per-phase times of a colocated synchronous step into the schedule each placement and
staleness implies, and prints the expected speed-up for every split of the devices.

The default phase times are ASSUMED, not measured (no GPU was available to this repository's
measurements): a 7B AGPO step on 8 x H100 with 128 prompts x 5 samples of up to 4k tokens, where
generation takes most of the step (issue 21 quotes verl and NeMo-RL runs in which it dominates), a
third of it waiting on the longest responses. Replace them with a run's own `time/*` rows
(`time/rollout`, `time/reward`, `time/logprobs` + `time/update`, `time/weight_sync`) before reading
anything into the result. How the model compares with a measurement on CPU: docs/benchmarks.md.

Partial rollouts (rollout.partial, the last column), to first order: the rollout side answers a batch
once its fastest groups complete and keeps generating the rest with the next batch, so the time spent
waiting on the longest responses alone (`--tail`) leaves the step, while their tokens still cost
throughput (counted in the other part). Modelled as staleness 1 with generation's tail share removed:
gen(R) = gen_c x (1 - tail) x N / R. It ignores the re-read
prefixes (one prefill per segment) and the spare batch's memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataclasses  # noqa: E402

from agpo_megatron.plan.schedule import PhaseTimes, colocated_step, disaggregated_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--generate", type=float, default=120.0, help="s per step, colocated, all devices (assumed)")
    p.add_argument("--reward", type=float, default=2.0)
    p.add_argument("--train", type=float, default=50.0, help="log-probs + update, s (assumed)")
    p.add_argument("--sync", type=float, default=3.0)
    p.add_argument("--handover", type=float, default=6.0, help="colocated sleep/wake/offload, s (assumed)")
    p.add_argument("--tail", type=float, default=0.33, help="share of generation spent on the longest responses")
    p.add_argument("--split-sync", type=float, default=None, help="trainer -> rollout sync, s (default: --sync)")
    args = p.parse_args()
    t = PhaseTimes(
        devices=args.devices,
        generate=args.generate,
        reward=args.reward,
        train=args.train,
        sync=args.sync,
        handover=args.handover,
        tail=args.tail,
    )
    base = colocated_step(t)
    print(f"colocated synchronous: {base:.1f} s/step (phase times: {t})")
    # Partial rollouts: the throughput-bound part of generation stays, the tail leaves the critical path.
    untailed = dataclasses.replace(t, generate=t.generate * (1 - t.tail), tail=0.0)
    print("\n| rollout + trainer devices | staleness 0 | staleness 1 | staleness 2 | staleness 1 + partial |")
    print("|---|---|---|---|---|")
    for r in range(1, args.devices):
        cells = [
            f"{base / disaggregated_step(t, rollout_devices=r, staleness=s, sync=args.split_sync):.2f}x"
            for s in (0, 1, 2)
        ]
        partial = disaggregated_step(untailed, rollout_devices=r, staleness=1, sync=args.split_sync)
        cells.append(f"{base / partial:.2f}x")
        print(f"| {r} + {args.devices - r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
