"""`agpo` command line.

    agpo train --config examples/agpo_qwen7b.yaml [dotted.key=value ...]   # run under torchrun/srun
    agpo check --config examples/agpo_qwen7b.yaml [overrides] [--world-size N]  # validate only
    agpo demo [--nproc 2] [demo args]                                      # the CPU demo (spawns torchrun)
    agpo plot runs/x/metrics.jsonl [-o out.png]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _train(args: argparse.Namespace) -> int:
    from agpo_megatron.config import load_train_config
    from agpo_megatron.parallel import exit_cleanly
    from agpo_megatron.preempt import EXIT_PREEMPTED, Preempted
    from agpo_megatron.trainer import train

    cfg = load_train_config(args.config, args.overrides)
    try:
        results = train(cfg)
    except Preempted as e:  # SIGTERM/SIGUSR1: stopped at a step boundary; rerun with resume=auto
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[agpo] {e}", file=sys.stderr)
        exit_cleanly(EXIT_PREEMPTED)
    if int(os.environ.get("RANK", "0")) == 0:
        print(results)
    exit_cleanly(0)
    return 0


def _check(args: argparse.Namespace) -> int:
    from agpo_megatron.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.world_size:
        dp = cfg.check_world(args.world_size)
        print(f"ok: world {args.world_size} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {dp}")
    else:
        print("ok")
    return 0


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from agpo_megatron.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--master-port={free_port()}", "-m", "agpo_megatron.demo", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _plot(args: argparse.Namespace) -> int:
    from agpo_megatron.metrics import plot

    print(plot(args.metrics, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("train", "check"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="dotted.key=value")
        if name == "check":
            p.add_argument("--world-size", type=int, default=0)
    p = sub.add_parser("demo", help="the CPU demo; extra args go to agpo_megatron.demo")
    p.add_argument("--nproc", type=int, default=2)
    p = sub.add_parser("plot")
    p.add_argument("metrics")
    p.add_argument("-o", "--out", default=None)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "demo":
        return _demo(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {rest}")
    return {"train": _train, "check": _check, "plot": _plot}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
