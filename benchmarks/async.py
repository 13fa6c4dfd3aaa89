"""Colocated synchronous vs disaggregated at staleness 0, 1 and 2, side by side in one run (CPU).

    OMP_NUM_THREADS=1 python benchmarks/async.py --out /tmp/async_bench --steps 8 --rounds 2
    OMP_NUM_THREADS=1 python benchmarks/async.py --out /tmp/async_ragged --steps 8 --stop-tokens 4

Each setting is a real `agpo train` run of the same world size (2 processes) on the same tiny random
Qwen2-shaped model, prompts and seeds: colocated (2 ranks, each Megatron + vLLM, DP=2, 2 replicas),
and 1 trainer rank + 1 rollout rank (DP=1, 1 replica) at rollout.max_staleness 0, 1 and 2, and at 1
and 2 with partial rollouts.

Step time: the trainer leader's phases are sequential, so a step's wall time is the sum of its
`time/*` row (in the async loop `time/rollout_wait` is the generation left over after the update it
overlapped). The table gives the median over each run's steps but its first (warm-up) and last (in
the async loop nothing overlaps it: no later batch is asked for); with `--rounds` the settings run in
turn, so the machine's load drift spreads over them. Trajectories/s and response tokens/s come from
it, and each side's busy fraction: the trainer's (log-probs + update + sync
over the step) and the rollout side's (its generation time over the step: `time/rollout` colocated; in
the async loop it is not measured on the trainer, so it is estimated from the staleness-0 run's).
"train wall / CPU s": the log-prob and update phases' wall time and the trainer process's CPU time in
them; wall well above CPU means the trainer waited for a core (on CPU the overlapped generation
competes for the same cores).

Lengths: sampled by the random model until EOS (p about 1/vocab per token) or `--max-new-tokens`: a
geometric spread with a capped tail, not step.py's log-normal (which needs a stub engine; this
benchmark needs real generation to overlap). `--stop-tokens K` declares K more token ids end-of-turn
(the model's generation_config.json), so p is about (K + 1)/vocab: shorter responses, and a group
(done when its longest response is) then has a long tail up to the cap: the distribution partial
rollouts are for.

Partial rollouts (`rollout.partial`, segments of `--segment-tokens`): the rollout rank holds a batch
more than it answers and answers as soon as a batch of whole groups is complete (rollout/partial.py).
"wait s" is `time/rollout_wait` (generation not hidden by the update); the token ages and the share of
tokens sampled before a pause (`async/token_age_*`, `async/paused_token_frac`) say what it cost.

The projection (plan/schedule.py) is fed the colocated run's own phase times (tail 0: not measured)
and its predicted speed-ups are printed beside the measured ones. It rescales them by device counts,
which on 2 shared cores do not behave as devices; so a second check feeds the schedule alone
(`sides_step`) each side's own times from the staleness-0 run of the same split and predicts the
staleness-1 and -2 steps from them.

NOTE: on a shared 2-core machine the two sides compete for the same cores, so what overlap gains
depends on the load; read the busy fractions and the projection's assumptions with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "colocated": [],
    "disagg s=0": ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=0"],
    "disagg s=1": ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=1"],
    "disagg s=2": ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=2"],
    "disagg s=1 partial": [
        "rollout.placement=disaggregated",
        "rollout.num_ranks=1",
        "rollout.max_staleness=1",
        "rollout.partial=true",
    ],
    "disagg s=2 partial": [
        "rollout.placement=disaggregated",
        "rollout.num_ranks=1",
        "rollout.max_staleness=2",
        "rollout.partial=true",
    ],
}


def make_inputs(work: Path, hidden: int, layers: int, stop_tokens: int) -> Path:
    from agpo_megatron.data import synthetic
    from agpo_megatron.models.tiny import save_tiny_hf_model

    tok = synthetic.build_tokenizer(work / "model")
    save_tiny_hf_model(
        work / "model",
        "qwen2",
        seed=0,
        tokenizer=tok,
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if stop_tokens:  # more end-of-turn tokens: shorter, more ragged responses (module doc)
        gen = work / "model" / "generation_config.json"
        config = json.loads(gen.read_text()) if gen.exists() else {}
        config["eos_token_id"] = [tok.eos_token_id, *range(20, 20 + stop_tokens)]
        gen.write_text(json.dumps(config))
    synthetic.write_jsonl(synthetic.make_dataset(64, seed=0, max_difficulty=1), work / "train.jsonl")
    (work / "train.yaml").write_text(
        f"data: {{train: {{path: {work / 'train.jsonl'}, answer_format: raw, prompt_template: '{{prompt}}'}}}}\n"
    )
    return work


def run(work: Path, name: str, overrides: list[str], args: argparse.Namespace, round_: int) -> list[dict]:
    from agpo_megatron.runtime.parallel import free_port

    out = work / f"{name.replace(' ', '_').replace('=', '')}_r{round_}"
    if args.reuse and (out / "metrics.jsonl").exists():  # summarize an earlier run's metrics again
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cmd = [
        sys.executable,
        "-m",
        "agpo_megatron.cli",
        "train",
        "--config",
        str(work / "train.yaml"),
        "model.params_dtype=float32",
        "model.spec=local",
        f"model.max_seq_len={32 + args.max_new_tokens}",
        f"model.hf_path={work / 'model'}",
        "algo.group_size=4",
        f"batch.prompts_per_rollout={args.prompts}",
        f"batch.micro_batch_size={args.micro_batch}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "rollout.kv_cache_memory_bytes=67108864",
        "rollout.enforce_eager=true",
        "rollout.enable_sleep_mode=false",
        "data.train.max_prompt_tokens=32",
        "logging.progress_bar=false",
        f"logging.out_dir={out}",
        f"steps={args.steps}",
        f"rollout.segment_tokens={args.segment_tokens}",
        *overrides,
    ]
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank)}
        env.update(LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"rank{rank}.out", "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if codes != [0, 0]:
        raise SystemExit(f"{name}: exit codes {codes}; see {out}/rank*.out")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def warm_steps(runs: list[list[dict]]) -> list[dict]:
    """Each run's steps but its first (warm-up; the async loop's prefill) and its last (the async loop
    has no later batch to ask for then, so nothing overlaps: it would flatter the async rows)."""
    return [r for rows in runs for r in (rows[1:-1] or rows)]


def summarize(runs: list[list[dict]], group: int, gen_estimate: float | None) -> dict[str, float]:
    warm = warm_steps(runs)
    step = statistics.median(sum(v for k, v in r.items() if k.startswith("time/")) for r in warm)
    trajectories = statistics.median(r["sampling/prompts_sampled"] for r in warm) * group
    tokens = statistics.median(r["len/mean"] for r in warm) * trajectories
    train = statistics.median(r["time/logprobs"] + r["time/update"] + r["time/weight_sync"] for r in warm)
    gen = statistics.median(r["time/rollout"] for r in warm) if gen_estimate is None else gen_estimate
    return {
        "step_s": step,
        "traj_per_s": trajectories / step,
        "tokens_per_s": tokens / step,
        "trainer_busy": min(train / step, 1.0),
        "rollout_busy": min(gen / step, 1.0),
        "generate_s": statistics.median(r["time/rollout"] for r in warm),
        "reward_s": statistics.median(r["time/reward"] for r in warm),
        "train_s": statistics.median(r["time/logprobs"] + r["time/update"] for r in warm),
        # The trainer process's own CPU seconds in the same phases: wall above it is waiting for a core.
        "train_cpu_s": statistics.median(r["cpu_time/logprobs"] + r["cpu_time/update"] for r in warm),
        "sync_s": statistics.median(r["time/weight_sync"] for r in warm),
        # Async runs: the generation the update did not hide, and how old the trained tokens were.
        "wait_s": statistics.median(r.get("time/rollout_wait", 0.0) for r in warm),
        "token_age_mean": statistics.fmean(r.get("async/token_age_mean", 0.0) for r in warm),
        "token_age_max": max(r.get("async/token_age_max", 0.0) for r in warm),
        "paused_frac": statistics.fmean(r.get("async/paused_token_frac", 0.0) for r in warm),
        "len_mean": statistics.fmean(r["len/mean"] for r in warm),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--stop-tokens", type=int, default=0, help="extra end-of-turn token ids (ragged lengths)")
    p.add_argument("--segment-tokens", type=int, default=16, help="rollout.segment_tokens (partial rows)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--reuse", action="store_true", help="summarize the runs already in --out instead of running")
    p.add_argument(
        "--rounds", type=int, default=1, help="run the settings in turn this many times (ABCD ABCD): load drift spreads"
    )
    args = p.parse_args()
    from agpo_megatron.plan.schedule import PhaseTimes, sides_step, sides_step_samples, speedups

    args.out.mkdir(parents=True, exist_ok=True)
    work = make_inputs(args.out, args.hidden, args.layers, args.stop_tokens)
    runs: dict[str, list[list[dict]]] = {name: [] for name in args.settings}
    for round_ in range(args.rounds):
        for name in args.settings:
            runs[name].append(run(work, name, SETTINGS[name], args, round_))
            print(f"round {round_}: {name} done", flush=True)
    results: dict[str, dict[str, float]] = {}
    gen_s0 = None
    for name in args.settings:
        async_run = name.startswith(("disagg s=1", "disagg s=2"))
        results[name] = summarize(runs[name], 4, gen_s0 if async_run else None)
        if name == "disagg s=0":
            gen_s0 = results[name]["generate_s"]
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("colocated")
    print(
        "\n| setting | step s | traj/s | tokens/s | vs colocated | trainer busy | rollout busy | train wall / CPU "
        "| wait s | token age mean / max | paused tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        print(
            f"| {name} | {r['step_s']:.2f} | {r['traj_per_s']:.2f} | {r['tokens_per_s']:.0f} | {ratio} "
            f"| {r['trainer_busy']:.0%} | {r['rollout_busy']:.0%} | {r['train_s']:.2f} / {r['train_cpu_s']:.2f} "
            f"| {r['wait_s']:.2f} | {r['token_age_mean']:.2f} / {r['token_age_max']:.0f} | {r['paused_frac']:.0%} |"
        )
    if base:
        t = PhaseTimes(
            devices=2, generate=base["generate_s"], reward=base["reward_s"], train=base["train_s"], sync=base["sync_s"]
        )
        predicted = speedups(t, rollout_devices=1)
        print("\nprojection (plan/schedule.py, fed the colocated run's phase times, tail 0):")
        for s, x in predicted.items():
            name = f"disagg s={s}"
            measured = base["step_s"] / results[name]["step_s"] if name in results else float("nan")
            print(f"  {name}: predicted {x:.2f}x, measured {measured:.2f}x")
    s0 = results.get("disagg s=0")
    if base and s0:
        # The schedule alone: each side's own times, measured in the staleness-0 run of this same
        # split (generation on the rollout process, log-probs + update on the trainer), no rescaling.
        print("\nschedule check (plan/schedule.sides_step, fed the s=0 run's per-side phase times):")
        sides = dict(generate=s0["generate_s"], reward=s0["reward_s"], train=s0["train_s"], sync=s0["sync_s"])
        for s in (0, 1, 2):
            name = f"disagg s={s}"
            if name not in results:
                continue
            predicted = base["step_s"] / sides_step(**sides, staleness=s)
            measured = base["step_s"] / results[name]["step_s"]
            off = predicted / measured - 1
            within = abs(off) <= 0.15
            print(f"  {name}: predicted {predicted:.2f}x, measured {measured:.2f}x ({off:+.0%}, within 15%: {within})")
        # The same, fed the s=0 run's per-step times: an overlapped step is the max of two varying phases.
        steps = warm_steps(runs["disagg s=0"])
        gen = [r["time/rollout"] for r in steps]
        train = [r["time/reward"] + r["time/logprobs"] + r["time/update"] for r in steps]
        print("schedule check with step-to-step variation (plan/schedule.sides_step_samples, the same run's steps):")
        for s in (0, 1, 2):
            name = f"disagg s={s}"
            if name not in results:
                continue
            step_s = sides_step_samples(generate=gen, train=train, sync=s0["sync_s"], staleness=s)
            predicted = base["step_s"] / step_s
            measured = base["step_s"] / results[name]["step_s"]
            off = predicted / measured - 1
            within = abs(off) <= 0.15
            print(f"  {name}: predicted {predicted:.2f}x, measured {measured:.2f}x ({off:+.0%}, within 15%: {within})")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
