"""`agpo` command line.

agpo train --nproc-per-node 8 --config examples/agpo_qwen7b.yaml [dotted.key=value ...]  # starts the ranks
agpo train --config examples/agpo_qwen7b.yaml [...]                    # one rank (under torchrun/srun)
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
    from agpo_megatron.runtime.run_lock import RunLockError

    return (
        ConfigError,
        DatasetError,
        CheckpointError,
        HFWriteError,
        UnsupportedModelError,
        NonFiniteError,
        RunLockError,
    )


_lock = None  # this process's run lock (rank 0 or the supervisor), released on every way out


def _release_lock() -> None:
    if _lock is not None:
        _lock.release()


def _take_lock(cfg) -> None:
    """Own `logging.out_dir` and `checkpoint.save_dir` (runtime/run_lock.py): before anything is allocated."""
    global _lock
    from agpo_megatron.runtime.run_lock import lock_run

    _lock = lock_run(cfg.logging.out_dir, cfg.checkpoint.save_dir)
    for note in _lock.notes:
        print(f"[agpo] {note}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, show_warnings: bool):
    """The config, its warnings (e.g. a setting without effect) as one line each on stderr, or none."""
    import warnings

    from agpo_megatron.plan.load import load_train_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_train_config(args.config, args.overrides)
    for w in caught if show_warnings else ():
        print(f"agpo {args.cmd}: warning: {w.message}", file=sys.stderr, flush=True)
    return cfg


def _crash_line(rank: int, e: BaseException) -> None:
    from agpo_megatron.report.console import console, log_path
    from agpo_megatron.runtime.launch import write_error

    if log_path() is None:  # --verbose: the traceback is on the console already
        return
    what = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    line = f"agpo train: rank {rank} failed: {what} (traceback in {log_path()})"
    if not write_error(line):
        print(line, file=console(), flush=True)


def _launch(args: argparse.Namespace) -> int:
    """`agpo train --nproc-per-node N`: validate, lock, start this node's ranks, one exit code."""
    from agpo_megatron.config.yaml_io import ConfigError
    from agpo_megatron.runtime.launch import LOCK_HELD_ENV, Supervisor

    if args.nnodes > 1 and (args.master_port is None or args.master_addr == "127.0.0.1"):
        raise ConfigError("--nnodes > 1 needs --master-addr and --master-port: every node must meet at node 0")
    cfg = _load(args, show_warnings=args.node_rank == 0)  # a bad config: one line, no rank started
    cfg.check_world(args.nproc_per_node * args.nnodes)
    cfg.check_machine()  # this node's vLLM / GPUs: one line, no rank started
    if args.node_rank == 0:
        _take_lock(cfg)
    flags = [*(["--debug"] if args.debug else []), *(["--verbose"] if args.verbose else [])]
    cmd = [sys.executable, "-m", "agpo_megatron.cli", "train", *flags, "--config", args.config, *args.overrides]
    try:
        return Supervisor(
            cmd,
            args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            env={LOCK_HELD_ENV: "1"},
        ).run()
    finally:
        _release_lock()


def _train(args: argparse.Namespace) -> int:
    if args.nproc_per_node:
        return _launch(args)
    from agpo_megatron.report.console import console, route_to_file
    from agpo_megatron.runtime.launch import LOCK_HELD_ENV

    t0 = time.time()
    # An srun task has no RANK yet (runtime/parallel.py maps SLURM_* later): its SLURM_PROCID decides
    # which task takes the run lock, or every task of the job would try to.
    srun_rank = os.environ.get("SLURM_PROCID", "0") if "SLURM_STEP_ID" in os.environ else "0"
    rank = int(os.environ.get("RANK") or srun_rank)
    # The supervisor has shown the config's warnings; under torchrun/srun, rank 0 shows them.
    cfg = _load(args, show_warnings=rank == 0 and not os.environ.get(LOCK_HELD_ENV))
    if rank == 0 and not os.environ.get(LOCK_HELD_ENV):
        _take_lock(cfg)
    if not (args.verbose or args.debug):  # before the libraries load: their logs and warnings go to the rank's file
        route_to_file(Path(cfg.logging.out_dir) / "logs" / f"rank{rank}.log")

    from agpo_megatron.runtime.parallel import at_exit, exit_cleanly
    from agpo_megatron.runtime.preempt import EXIT_PREEMPTED, Preempted
    from agpo_megatron.train.session import Session
    from agpo_megatron.train.trainer import train

    at_exit(_release_lock)
    try:
        if cfg.rollout.placement == "disaggregated":
            from agpo_megatron.train import disaggregated

            results = disaggregated.run(cfg)  # a rollout rank returns {} when the trainer is done
        else:
            results = train(Session.create(cfg))
    except Preempted as e:  # SIGTERM/SIGUSR1: stopped at a step boundary; rerun with resume=auto
        if rank == 0:
            print(f"[agpo] {e}", file=console(), flush=True)
        exit_cleanly(EXIT_PREEMPTED)
    except _user_errors():
        raise  # one line, in main()
    except Exception as e:  # a bug or a library failure: its traceback goes to the rank's log, a line here
        _crash_line(rank, e)
        raise
    if rank == 0:
        print(results)  # the full dict, into the log (or the terminal with --verbose)
        for key in ("eval_before", "eval_after"):
            if isinstance(results.get(key), dict):
                shown = {k: v for k, v in results[key].items() if "/" not in k}
                text = "  ".join(
                    f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in shown.items()
                )
                print(f"[agpo] {key}: {text}", file=console())
        # `agpo compare` reads the final eval and the wall time from here.
        Path(cfg.logging.out_dir, "results.json").write_text(
            json.dumps({**results, "wall_time_s": time.time() - t0}, indent=2, default=str)
        )
        print(f"[agpo] done: {Path(cfg.logging.out_dir, 'results.json')}", file=console(), flush=True)
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
        r = cfg.rollout
        if r.placement == "disaggregated":
            trainers = r.trainer_ranks(args.world_size)
            print(
                f"ok: world {args.world_size} = {trainers} trainer ranks (tp {cfg.parallel.tp} x pp {cfg.parallel.pp} "
                f"x dp {dp}) + {r.num_ranks} rollout ranks ({r.num_ranks // r.tp} vLLM replicas at tp {r.tp})"
            )
        else:
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
    # `--debug` is accepted before and after the subcommand; SUPPRESS keeps the other position's value.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of a user error"
    )
    for name in ("train", "check", "plan"):
        p = sub.add_parser(name, parents=[debug])
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="dotted.key=value")
        if name == "train":
            p.add_argument(
                "--nproc-per-node",
                type=int,
                default=0,
                help="start this many ranks on this node (a supervisor: one exit code, signals forwarded)",
            )
            p.add_argument("--nnodes", type=int, default=1, help="with --nproc-per-node: number of nodes")
            p.add_argument("--node-rank", type=int, default=0, help="with --nproc-per-node: this node's index")
            p.add_argument("--master-addr", default="127.0.0.1", help="with --nnodes > 1: node 0's address")
            p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
            p.add_argument(
                "--verbose",
                action="store_true",
                help="library logs (vLLM, Megatron, torch, warnings) on the console, not in out_dir/logs/rank*.log "
                "(--debug too)",
            )
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
    args.debug = getattr(args, "debug", False)
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
        line = f"agpo {args.cmd}: error: {e}"
        if args.cmd != "train":
            print(line, file=sys.stderr, flush=True)
            return 2
        from agpo_megatron.report.console import console
        from agpo_megatron.runtime.launch import write_error

        if not write_error(line):  # under `--nproc-per-node` the supervisor prints it, once
            print(line, file=console(), flush=True)
        # no barrier: a peer may be waiting in a collective; the launcher ends it
        sys.stdout.flush()
        _release_lock()
        os._exit(2)


if __name__ == "__main__":
    sys.exit(main())
