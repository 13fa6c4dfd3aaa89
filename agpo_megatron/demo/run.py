"""The CPU demo: a tiny model learns a task, then AGPO and a GRPO baseline train it from the same start.

    torchrun --nproc-per-node 2 -m agpo_megatron.demo.run [--out runs/demo] [--task steps|arith]
        [--arms grpo,agpo] [dotted.key=value ...]

1. Build a tiny Qwen2-shaped model (head dim 32, vLLM's CPU minimum) with the task's word-level
   tokenizer in its own folder (`model/tokenizer/`, see `models.hf_config.tokenizer_path`).
2. Warm-start it with a short supervised phase (`train/sft.py`, this package's loop on the Megatron
   actor). The default task, `steps` (`data/synthetic_steps.py`), trains on solutions that hold the
   intermediate steps (reasoning that helps) or not, and 0-3 units of waste (copied, never
   computed) after the box (`--waste-at before`: before the steps, the first design), all 8
   combinations in equal shares. A design check follows on the warm start
   (`demo/design.py`): accuracy with every cell forced, to show that the steps matter and the
   waste does not, before any RL. `--task arith` is the earlier task (verbosity by repeated
   arithmetic), kept as an option.
3. RL, one run per arm (`ARMS`: label and config overrides), each from the same warm-start weights
   on the same prompts: GRPO (the baseline) and AGPO (m1 + m2). vLLM rollouts, Megatron updates.
   The trainer logs the steps task's reasoning tokens, waste tokens and step presence per step.
4. Print the tables: held-out pass@1 and tokens (split into reasoning and waste), greedy and
   sampled (T=1, n=4; pass@1 = the mean over samples), before RL and after each arm, and the
   fraction of AGPO's groups where the length reward fired.

Library logs go to OUT/logs/rank*.log (`--verbose`: on the console); `agpo demo --seeds 0-7`
runs several seeds (`demo/seeds.py`, statistics in `demo/summary.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from agpo_megatron.config import arms as arm_table

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo_cpu.yaml"


TASKS = ("steps", "arith")

_LABELS = {"agpo-m1": "AGPO-m1", "drgrpo": "Dr.GRPO"}

ARMS: dict[str, tuple[str, list[str]]] = {
    **{name: (_LABELS.get(name, name.upper()), arm_table.arm_overrides(name)) for name in arm_table.ARMS},
    # The demo's own two keep its config as written (AGPO m1 + m2) and change only what GRPO changes,
    # so overrides given to the demo (e.g. algo.loss.ratio_level) still reach them.
    "grpo": ("GRPO", ["algo.advantage=grpo", "algo.length_reward=false"]),
    "agpo": ("AGPO", []),
}
"""`--arms` names -> (label, dotted overrides on the demo config): the arms of config/arms.py (agpo-m1,
dapo, gspo, rloo, drgrpo), so the demo and the sweep mean the same method by the same name, and the
demo's GRPO and AGPO. Every arm starts from the same warm-start weights and sees the same prompts."""

EVAL_MODES = (("greedy", 0.0, 1), ("sampled", 1.0, 4))
"""The held-out evaluation: greedy, and sampled at temperature 1 with 4 samples per problem
(pass@1 = the mean over samples, which does not flip all or nothing like greedy)."""


def prepare(
    out: Path,
    *,
    task: str,
    seed: int,
    n_train: int,
    n_eval: int,
    max_difficulty: int,
    operands: tuple[int, ...],
    waste_at: str = "after",
) -> None:
    """Rank 0 writes tokenizer + random model + synthetic data (the other ranks wait)."""
    from agpo_megatron.data import synthetic, synthetic_steps
    from agpo_megatron.models.inputs import write_tiny_model

    write_tiny_model(out / "model", "qwen2", seed=seed)  # the model `tiny:qwen2` names in a config
    if task == "steps":
        train, held = synthetic_steps.make_split(n_train, n_eval, seed, operands=operands, waste_at=waste_at)
        synthetic.write_jsonl(train, out / "train.jsonl")
        synthetic.write_jsonl(held, out / "eval.jsonl")
        return
    for name, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
        synthetic.write_jsonl(synthetic.make_dataset(n, seed=s, max_difficulty=max_difficulty), out / f"{name}.jsonl")


def parse_arms(text: str) -> list[str]:
    """`grpo,agpo` -> ["grpo", "agpo"] (known names, no repeats)."""
    arms = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--arms: expected distinct names from {sorted(ARMS)}, got {text!r}")
    return arms


def _mean_over_steps(metrics_path: Path, key: str) -> float | None:
    from agpo_megatron.report.jsonl import read_jsonl

    vals = [r[key] for r in read_jsonl(metrics_path) if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    rank = int(os.environ.get("RANK", "0"))
    if not args.verbose:
        # Before any library import: vLLM/Megatron/torch logging, warnings and native prints go to
        # the file; the console keeps the progress bars and the table.
        from agpo_megatron.report.console import route_to_file

        route_to_file(out / "logs" / f"rank{rank}.log")
    try:
        _run(args, out)
    except BaseException:
        from agpo_megatron.report.console import report_failure

        report_failure(rank)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=str(EXAMPLE))
    p.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: steps 600, arith 300)")
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument(
        "--task",
        choices=TASKS,
        default="steps",
        help="steps: reasoning that helps vs waste that cannot (default); arith: the earlier verbosity task",
    )
    p.add_argument(
        "--design-only",
        action="store_true",
        help="steps task: warm start + design check, then stop (writes OUT/design.json; no RL)",
    )
    p.add_argument("--arms", default="grpo,agpo", help=f"RL runs from the same warm start, in order ({sorted(ARMS)})")
    p.add_argument("--max-difficulty", type=int, default=1, help="arith: 0: a+b, 1: up to 3 operands, 2: up to 4")
    p.add_argument("--operands", default="3,4", help="steps: operands per problem, 3 and/or 4")
    p.add_argument(
        "--waste-at",
        choices=("before", "after"),
        default="after",
        help="steps: waste after the box, where it cannot touch the answer (default), or before the steps "
        "(the first design: there waste went with skipping the steps while sampling, docs/demo.md)",
    )
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="only the AGPO arm (same as --arms agpo)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="library logs (vLLM, Megatron, torch, warnings) on the console instead of OUT/logs/rank*.log",
    )
    p.add_argument("overrides", nargs="*")
    return p


def _run(args: argparse.Namespace, out: Path) -> None:
    import torch.distributed as dist

    from agpo_megatron.bridge.export import sync_weights
    from agpo_megatron.data import synthetic_steps
    from agpo_megatron.demo.design import design_check, format_design
    from agpo_megatron.evals.evaluate import EvalMode, format_table
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.report.console import console, log_path
    from agpo_megatron.report.plot import parse_runs, plot_runs
    from agpo_megatron.runtime.parallel import exit_cleanly, init_distributed
    from agpo_megatron.train.policy import Actor
    from agpo_megatron.train.session import Session
    from agpo_megatron.train.sft import sft
    from agpo_megatron.train.trainer import train

    arms = parse_arms(args.arms) if args.baseline else ["agpo"]
    if args.sft_steps is None:  # the steps task's design check needs 600 (docs/demo.md)
        args.sft_steps = 600 if args.task == "steps" else 300
    t0 = time.time()
    init_distributed()
    if dist.get_rank() == 0:
        prepare(
            out,
            task=args.task,
            seed=args.seed,
            n_train=args.n_train,
            n_eval=args.n_eval,
            max_difficulty=args.max_difficulty,
            operands=tuple(int(k) for k in args.operands.split(",")),
            waste_at=args.waste_at,
        )
    dist.barrier()
    paths = [
        f"model.hf_path={out / 'model'}",
        f"data.train.path={out / 'train.jsonl'}",
        f"data.eval.path={out / 'eval.jsonl'}",
    ]
    cfg = load_train_config(args.config, [*paths, f"logging.out_dir={out / 'agpo'}", *args.overrides])
    session = dataclasses.replace(
        Session.create(cfg),
        eval_modes=tuple(EvalMode(*m) for m in EVAL_MODES),
        analyze=synthetic_steps.analyze if args.task == "steps" else None,
    )
    rank0 = session.layout.rank == 0

    # 1. Warm start on its own actor (its own LR), NLL on (prompt, solution + eos).
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    eos = session.tokenizer.eos_token_id
    # load_examples keeps file order (no shuffle_seed), so rows and examples line up.
    pairs = [
        (ex.prompt_ids, session.tokenizer.encode(row["solution"], add_special_tokens=False) + [eos])
        for ex, row in zip(session.train_examples, rows, strict=True)
    ]
    t_sft = time.time()
    warm = Actor(
        session.arch, replace(cfg, optim=replace(cfg.optim, lr=args.sft_lr)), session.layout, total_steps=args.sft_steps
    )
    sft(
        warm,
        pairs,
        steps=args.sft_steps,
        batch_size=args.sft_batch,
        micro_batch_size=args.sft_batch // session.layout.dp,
        layout=session.layout,
        pad_id=session.pad_id,
        seed=args.seed,
        progress_bar=cfg.logging.progress_bar,
    )
    design = None
    if args.task == "steps":  # the design check, on the warm start, before any RL
        session.rollout.wake_weights()
        sync_weights(warm.chunks, session.arch, session.rollout)
        session.rollout.wake_kv_cache()
        design = design_check(session, seed=args.seed, waste_at=args.waste_at)
        session.rollout.sleep()  # as Session.create left it: the trainer wakes and syncs it
        if args.design_only:
            if rank0:
                (out / "design.json").write_text(json.dumps(design, indent=2))
                print(f"\nDesign check (warm start):\n{format_design(design)}", file=console(), flush=True)
            exit_cleanly(0)
    start = warm.local_weights()
    del warm
    t_sft = time.time() - t_sft

    # 2. RL from the same warm start, one run per arm, on the same prompts.
    results, times = {}, {}
    for arm in arms:
        label, arm_overrides = ARMS[arm]
        # Its own save_dir: with resume=auto a run would otherwise continue from another's checkpoints.
        own = [f"checkpoint.save_dir={Path(cfg.checkpoint.save_dir) / arm}"] if cfg.checkpoint.save_dir else []
        run_cfg = load_train_config(
            args.config, [*paths, f"logging.out_dir={out / arm}", *args.overrides, *arm_overrides, *own]
        )
        t = time.time()
        actor = Actor(session.arch, run_cfg, session.layout, total_steps=run_cfg.optimizer_steps(), init_weights=start)
        results[label] = train(session.for_run(run_cfg), actor=actor)
        times[label] = time.time() - t
        del actor

    if rank0:
        first = next(iter(results.values()))
        rows_by_run = {
            "warm start (before RL)": first["eval_before"],
            **{f"{label}, {cfg.steps} steps": r["eval_after"] for label, r in results.items()},
        }
        tables = {name: format_table(rows_by_run, prefix=f"{name}/") for name, *_ in EVAL_MODES}
        # Where m2 can act: groups with some correct and some wrong answers (mean over steps).
        m2 = _mean_over_steps(out / "agpo" / "metrics.jsonl", "len_reward/frac_len_reward_groups")
        note = f"AGPO's length reward fired in {100 * m2:.0f}% of groups (mean over steps)." if m2 is not None else ""
        total = time.time() - t0  # the curves below are not part of the demo's time
        specs = [f"{label}={out / arm}" for arm, (label, _) in zip(arms, (ARMS[a] for a in arms))]
        curves = plot_runs(parse_runs(specs), out / "curves.png", PLOT_KEYS[args.task])
        print(
            (
                f"\nDesign check (warm start, {design['num_problems']} held-out problems):\n{format_design(design)}\n"
                if design
                else ""
            )
            + "".join(f"\nHeld-out, {name} (T={temp}, n={n}):\n{tables[name]}\n" for name, temp, n in EVAL_MODES)
            + f"\n{note}\nwarm-start {t_sft:.0f}s, "
            + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
            + f", total {total:.0f}s.\nCurves: {curves} (agpo plot {' '.join(specs)})"
            + (f"\nLibrary logs: {log_path().parent}/" if log_path() else ""),
            file=console(),
            flush=True,
        )
        (out / "results.json").write_text(
            json.dumps(
                {
                    "task": args.task,
                    "runs": results,
                    "design": design,
                    "time_sft_s": t_sft,
                    "time_rl_s": times,
                    "time_total_s": total,
                    "tables": tables,
                    "frac_m2_groups": m2,
                    "args": {k: v for k, v in vars(args).items() if k != "verbose"},
                },
                indent=2,
            )
        )
    exit_cleanly(0)


PLOT_KEYS = {
    "steps": ("acc/mean", "len/mean", "task/reasoning_tokens", "task/waste_tokens", "task/steps_present"),
    "arith": ("reward/mean", "acc/mean", "len/mean", "len/correct_mean"),
}


if __name__ == "__main__":
    main()
