"""`agpo` command line.

agpo train --config examples/agpo_qwen7b.yaml [dotted.key=value ...]   # run under torchrun/srun
agpo check --config examples/agpo_qwen7b.yaml [overrides] [--world-size N]  # validate (+ memory plan)
agpo plan --config examples/agpo_qwen7b.yaml --world-size 8 [--gpu-mem-gb 80] [overrides]  # memory per rank
agpo demo [--nproc 2] [demo args]                                      # the CPU demo (spawns torchrun)
agpo demo --seeds 0-4 [--out runs/demo_seeds] [demo args]              # the demo at several seeds + table
agpo plot runs/x/metrics.jsonl [-o out.png]
agpo plot GRPO=runs/demo/grpo AGPO=runs/demo/agpo [-o overlay.png]   # several runs in one figure
agpo eval --model <HF dir | step folder> [--model ...] --data FILE     # Table 1 for any checkpoint (vLLM)
agpo compare runs/a runs/b ... [-o compare]                            # compare.md table + compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's config, data, model or checkpoint (each names what is wrong)."""
    from agpo_megatron.bridge.hf_writer import HFWriteError
    from agpo_megatron.checkpoint import CheckpointError
    from agpo_megatron.config.yaml_io import ConfigError
    from agpo_megatron.data.datasets import DatasetError
    from agpo_megatron.models.hf_config import UnsupportedModelError
    from agpo_megatron.runtime.nonfinite import NonFiniteError

    return ConfigError, DatasetError, CheckpointError, HFWriteError, UnsupportedModelError, NonFiniteError


def _train(args: argparse.Namespace) -> int:
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.runtime.parallel import exit_cleanly
    from agpo_megatron.runtime.preempt import EXIT_PREEMPTED, Preempted
    from agpo_megatron.train.session import Session
    from agpo_megatron.train.trainer import train

    t0 = time.time()
    cfg = load_train_config(args.config, args.overrides)
    try:
        results = train(Session.create(cfg))
    except Preempted as e:  # SIGTERM/SIGUSR1: stopped at a step boundary; rerun with resume=auto
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[agpo] {e}", file=sys.stderr)
        exit_cleanly(EXIT_PREEMPTED)
    if int(os.environ.get("RANK", "0")) == 0:
        print(results)
        # `agpo compare` reads the final eval and the wall time from here.
        Path(cfg.logging.out_dir, "results.json").write_text(
            json.dumps({**results, "wall_time_s": time.time() - t0}, indent=2, default=str)
        )
    exit_cleanly(0)
    return 0


def _check(args: argparse.Namespace) -> int:
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.plan.preflight import check_data, check_paths

    cfg = load_train_config(args.config, args.overrides)
    check_paths(cfg)
    for line in check_data(cfg):
        print(line)
    if args.world_size:
        dp = cfg.check_world(args.world_size)
        print(f"ok: world {args.world_size} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {dp}")
        if cfg.model.hf_path:  # the memory plan needs config.json; warnings only, exit code stays 0
            from agpo_megatron.plan.memory import plan_memory
            from agpo_megatron.plan.report import warnings

            for line in warnings(plan_memory(cfg, args.world_size, gpu_gb=args.gpu_mem_gb)):
                print(line)
    else:
        print("ok")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.plan.memory import plan_memory
    from agpo_megatron.plan.report import render

    cfg = load_train_config(args.config, args.overrides)
    print(render(plan_memory(cfg, args.world_size, gpu_gb=args.gpu_mem_gb, margin_gb=args.margin_gb)))
    return 0


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from agpo_megatron.demo.seeds import main as sweep
    from agpo_megatron.demo.seeds import run_demo

    if any(a == "--seeds" or a.startswith("--seeds=") for a in rest):
        return sweep([*rest, f"--nproc={args.nproc}"])
    return run_demo(args.nproc, rest)


def _plot(args: argparse.Namespace) -> int:
    from agpo_megatron.report.plot import DEFAULT_KEYS, default_out, parse_runs, plot_runs

    try:
        runs = parse_runs(args.runs)
        print(plot_runs(runs, args.out or default_out(runs), tuple(args.keys) if args.keys else DEFAULT_KEYS))
    except ValueError as e:  # a missing run or no plottable metric: one line naming it
        print(f"agpo plot: {e}", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    from agpo_megatron.report.compare import compare

    try:
        table, md, png = compare(args.runs, args.out)
    except ValueError as e:  # a missing or malformed run: one line naming it
        print(f"agpo compare: {e}", file=sys.stderr)
        return 2
    print(table + f"\n\nwrote {md} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("train", "check", "plan"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="dotted.key=value")
        if name in ("check", "plan"):
            p.add_argument("--world-size", type=int, required=name == "plan", default=0)
            p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory in GiB (H100: 80, H200: 141)")
        if name == "plan":
            p.add_argument(
                "--margin-gb",
                type=float,
                default=None,
                help="reserve for CUDA context, NCCL and fragmentation (default 4 GiB + 5%%)",
            )
    sub.add_parser("eval", help="pass@1, pass@n, tokens, per level, side by side (agpo eval --help)", add_help=False)
    p = sub.add_parser("demo", help="the CPU demo; extra args go to agpo_megatron.demo.run")
    p.add_argument("--nproc", type=int, default=2)
    p = sub.add_parser(
        "plot",
        help="curves of one run, or of several overlaid ([LABEL=]PATH; a label shared "
        "by several runs draws their mean)",
    )
    p.add_argument("runs", nargs="+", help="[LABEL=]PATH: a metrics.jsonl or run directory, or a quoted glob")
    p.add_argument("-o", "--out", default=None, help="PNG path (one run: next to its metrics.jsonl)")
    p.add_argument("--keys", nargs="+", default=None, help="metrics to plot, one panel each")
    p = sub.add_parser("compare", help="one Markdown table + one PNG across run directories")
    p.add_argument("runs", nargs="+", help="run directories (logging.out_dir)")
    p.add_argument("-o", "--out", default="compare", help="output prefix: writes OUT.md and OUT.png")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of a user error")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "demo":
        return _demo(args, rest)
    if args.cmd == "eval":
        from agpo_megatron.evals.cli_eval import main as eval_main

        return eval_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {rest}")
    USER_ERRORS = _user_errors()
    try:
        return {"train": _train, "check": _check, "plan": _plan, "plot": _plot, "compare": _compare}[args.cmd](args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        # One line naming the file/field, exit 2 (a traceback says nothing a user can act on).
        print(f"agpo {args.cmd}: error: {e}", file=sys.stderr, flush=True)
        if args.cmd == "train":  # no barrier: a peer may be waiting in a collective; torchrun ends it
            sys.stdout.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
