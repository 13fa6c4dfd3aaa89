"""RL step time per phase, and padding efficiency, with sequence packing on and off (one run).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/step.py --steps 4 --dist ragged uniform

Runs the real trainer (`trainer.train`: reward, advantages, DP balancing, micro-batching, old /
reference log-probs, the Megatron update, the weight export) at world size 2 (DP=2, or TP=2 /
PP=2 with `--tp` / `--pp`) on a tiny random Qwen2-shaped model, first with `batch.packing=false`,
then `true`, on the same prompts and the same responses, and prints per phase the median seconds
over the steps after the first (warm-up), tokens/s and the padding efficiency.

Controlling the response lengths. The rollout engine is a stub (`LengthEngine`): it returns
random token ids (never EOS) of a length drawn per (step, prompt, sample) from the chosen
distribution, and a text `\\boxed{0}` or `\\boxed{1}` so that the real math-verify reward yields
mixed groups. It does not run the model, so the "rollout" row measures the stub, not generation;
"weight_sync" is the real export (`sync_weights`: the TP/PP gather and HF re-layout) into an
engine that only consumes the tensors. Everything from the reward to the update is the
trainer's own code. Forcing lengths this way keeps the batch identical in the padded and packed
runs, which sampling with vLLM (even with ignore_eos and per-request max tokens) would not
guarantee across two runs and would make the benchmark slow on CPU.

Distributions (response tokens, before `--scale`):
- ragged: log-normal with median 500 and sigma 0.8, clipped to [100, 3000]: a synthetic stand-in
  for the spread of MATH solutions from a 7B reasoning model (most a few hundred tokens, a long
  tail to the limit); not fitted to measured lengths;
- uniform: every response the same length, the ragged distribution's mean (same token count,
  nothing for packing to remove but the rounding to the pad multiple).
`--scale` (default 1/8) maps them to the tiny context: 12-375 tokens.

Tokens/s: rollout and reward count response tokens; logprobs and update count the step's real
(prompt + response) tokens once per pass (logprobs: actor and reference passes together);
weight_sync has no token figure. Padding efficiency = real tokens / computed tokens (rows x
length of every micro-batch, over both DP ranks), the same for the log-prob passes and the update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo_cpu.yaml"
PHASES = ("rollout", "reward", "logprobs", "update", "weight_sync")


def _ragged(rng: random.Random) -> float:
    return min(3000.0, max(100.0, rng.lognormvariate(math.log(500), 0.8)))


_MEAN_RNG = random.Random(12345)
_RAGGED_MEAN = statistics.fmean(_ragged(_MEAN_RNG) for _ in range(20000))


def response_length(dist_name: str, rng: random.Random, scale: float) -> int:
    n = _ragged(rng) if dist_name == "ragged" else _RAGGED_MEAN  # uniform: the ragged mean, for everyone
    return max(1, round(n * scale))


class LengthEngine:
    """A `RolloutEngine` stub: responses of forced lengths (module docstring). Same output on every rank."""

    def __init__(self, dist_name: str, *, vocab: int, scale: float):
        from agpo_megatron.rollout.base import Completion

        self.dist_name, self.vocab, self.scale, self.Completion = dist_name, vocab, scale, Completion

    def generate(self, prompts, n, sampling):
        out = []
        for p in range(len(prompts)):
            group = []
            for j in range(n):
                rng = random.Random(f"{sampling.seed}/{p}/{j}")
                length = min(response_length(self.dist_name, rng, self.scale), sampling.max_new_tokens)
                ids = [rng.randrange(3, self.vocab) for _ in range(length)]
                group.append(
                    self.Completion(
                        prompt_index=p,
                        token_ids=ids,
                        logprobs=None,
                        finish_reason="stop",
                        text=f"\\boxed{{{rng.randrange(2)}}}",
                    )
                )
            out.append(group)
        return out

    def update_weights(self, weights) -> None:
        for _ in weights:  # the export itself is what is measured
            pass

    def sleep(self) -> None: ...

    def wake_weights(self) -> None: ...

    def wake_kv_cache(self) -> None: ...


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_step")
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, in ABBA order")
    p.add_argument("--dist", nargs="+", default=["ragged", "uniform"], choices=["ragged", "uniform"])
    p.add_argument("--scale", type=float, default=1 / 8, help="response lengths x this (the tiny context)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--micro-batch", type=int, default=4, help="batch.micro_batch_size")
    p.add_argument("--max-tokens", type=int, default=None, help="batch.max_tokens_per_micro_batch")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="more dotted config overrides")
    return p.parse_args()


def main() -> None:
    from agpo_megatron.data.datasets import Example
    from agpo_megatron.models.hf_config import read_arch
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.report.jsonl import read_jsonl
    from agpo_megatron.runtime.parallel import (
        exit_cleanly,
        init_distributed,
        init_model_parallel,
    )
    from agpo_megatron.train.session import Session
    from agpo_megatron.train.trainer import train

    args = parse_args()
    out = Path(args.out).resolve()
    init_distributed()
    rank0 = dist.get_rank() == 0
    prompt_max = 32
    longest = max(1, round(3000 * args.scale))
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_tiny_hf_model(
            out / "model",
            "qwen2",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_layers=args.layers,
            num_heads=args.hidden // 64,
            num_kv_heads=max(1, args.hidden // 128),
            max_position_embeddings=4096,
        )
        (out / "train.jsonl").write_text(json.dumps({"question": "unused", "answer": "0"}) + "\n")
    dist.barrier()
    arch = read_arch(out / "model")
    rng = random.Random(0)
    examples = [
        Example(
            prompt_ids=[rng.randrange(3, args.vocab) for _ in range(rng.randint(16, prompt_max))],
            prompt_text="",
            gold="0",
            index=i,
        )
        for i in range(args.prompts * 64)
    ]
    results: dict[str, list[dict]] = {}
    # ABBA: padded, packed, packed, padded, ...: a load drifting over the run hits both alike.
    runs = [
        (d, packing, r)
        for d in args.dist
        for r in range(args.repeats)
        for packing in ((False, True) if r % 2 == 0 else (True, False))
    ]
    for dist_name, packing, rep in runs:
        label = f"{dist_name}/{'packed' if packing else 'padded'}"
        run_dir = out / dist_name / f"{'packed' if packing else 'padded'}_{rep}"
        if rank0:  # this run's rows only, not an earlier invocation's
            shutil.rmtree(run_dir, ignore_errors=True)
        dist.barrier()
        cfg = load_train_config(
            EXAMPLE,
            [
                f"model.hf_path={out / 'model'}",
                f"data.train.path={out / 'train.jsonl'}",
                f"data.eval.path={out / 'train.jsonl'}",
                f"logging.out_dir={run_dir}",
                "logging.progress_bar=false",
                f"steps={args.steps}",
                f"batch.packing={str(packing).lower()}",
                f"batch.prompts_per_rollout={args.prompts}",
                f"algo.group_size={args.group}",
                f"batch.micro_batch_size={args.micro_batch}",
                f"data.train.max_prompt_tokens={prompt_max}",
                f"data.eval.max_prompt_tokens={prompt_max}",
                f"rollout.max_new_tokens={longest}",
                f"model.max_seq_len={prompt_max + longest}",
                f"parallel.tp={args.tp}",
                f"parallel.pp={args.pp}",
                "algo.loss.kl_coef=0.001",
                *([f"batch.max_tokens_per_micro_batch={args.max_tokens}"] if args.max_tokens else []),
                *args.overrides,
            ],
        )
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=None))
        cfg.check_world(dist.get_world_size())
        layout = init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.seed)
        engine = LengthEngine(dist_name, vocab=args.vocab, scale=args.scale)
        session = Session(cfg, arch, layout, None, 0, examples, [], engine)
        train(session)
        if rank0:  # the first step of every run warms up
            results.setdefault(label, []).extend(read_jsonl(run_dir / "metrics.jsonl")[1:])
        dist.barrier()
    if rank0:
        report(results, args)
    exit_cleanly(0)


def summarize(rows: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}


def report(results: dict[str, list[dict]], args) -> None:
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.prompts} prompts x "
        f"{args.group} responses per step, micro_batch_size {args.micro_batch}, max_tokens {args.max_tokens}, "
        f"tp {args.tp}, pp {args.pp}; median over {args.repeats} runs x steps 2..{args.steps} (ABBA order); "
        f"wall s and rank-0 CPU s"
    )
    for dist_name in args.dist:
        pad, pack = (summarize(results[f"{dist_name}/{k}"]) for k in ("padded", "packed"))
        n_resp = args.prompts * args.group
        print(
            f"\n[{dist_name}] real tokens/step {pad['batch/real_tokens']:.0f} "
            f"(responses: mean {pad['len/mean']:.0f}, max {pad['len/max']:.0f} tokens)"
        )
        print(
            "| phase | padded wall s | packed wall s | packed/padded wall | padded CPU s | packed CPU s "
            "| packed/padded CPU | padded tok/s | packed tok/s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for phase in (*PHASES, "logprobs+update"):
            keys = ("logprobs", "update") if phase == "logprobs+update" else (phase,)
            a, b = (sum(m[f"time/{k}"] for k in keys) for m in (pad, pack))
            ca, cb = (sum(m[f"cpu_time/{k}"] for k in keys) for m in (pad, pack))
            tokens = {
                "rollout": pad["len/mean"] * n_resp,
                "reward": pad["len/mean"] * n_resp,
                "logprobs": pad["batch/real_tokens"],
                "update": pad["batch/real_tokens"],
            }.get(phase)
            tps = f"{tokens / a:.0f} | {tokens / b:.0f}" if tokens else "- | -"
            print(f"| {phase} | {a:.3f} | {b:.3f} | {b / a:.2f} | {ca:.3f} | {cb:.3f} | {cb / ca:.2f} | {tps} |")
        print(
            f"padding efficiency (real / computed tokens): padded {pad['batch/padding_efficiency']:.3f}, "
            f"packed {pack['batch/padding_efficiency']:.3f}; computed tokens/step {pad['batch/computed_tokens']:.0f} "
            f"-> {pack['batch/computed_tokens']:.0f}"
        )


if __name__ == "__main__":
    main()
