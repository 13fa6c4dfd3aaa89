"""The AGPO paper's comparisons, the baselines (DAPO, GSPO, RLOO, Dr.GRPO) and A-GRPO's ablations as one
nemo-run experiment, then `agpo compare` (one table, one row per task).

    # one machine: tasks run one after another, each `agpo train --nproc-per-node N` (its exit code kept)
    python examples/sweeps/paper_ablation.py --executor local --nproc 8
    # a Slurm cluster, from a login node (LocalTunnel) or from a laptop (SSH tunnel):
    python examples/sweeps/paper_ablation.py --executor slurm --account ACCT --partition PART
    python examples/sweeps/paper_ablation.py --executor slurm --ssh-host login.cluster --ssh-user me \
        --remote-dir /lustre/me/nemo_run --repo /lustre/me/agpo-megatron --python /lustre/me/venv/bin/python
    # the tiny CPU version (examples/tiny_cpu.yaml, 3 tasks), what CI runs against a local cluster:
    python examples/sweeps/paper_ablation.py --executor slurm --tiny --gpus-per-node 0 --nproc 2
    python examples/sweeps/paper_ablation.py --list     # print the tasks and their overrides
    python examples/sweeps/paper_ablation.py --arms grpo,agpo,dapo,gspo,rloo,drgrpo   # AGPO and its baselines

Install: the `launch` extra of pyproject.toml (nemo-run 0.11.1 with leptonai<0.47; newer leptonai
breaks the import). NOTE: leptonai<0.47 pins starlette<1, which vLLM 0.32 refuses, so keep nemo-run
in its own venv: scripts/setup_cpu.sh makes .venv-launch with only that extra's packages. Run this
script with that venv's python and point --python at the training venv.

Every task is `PYTHON -m agpo_megatron.cli train --config BASE <overrides>` over one base config
(examples/agpo_qwen7b.yaml, or examples/tiny_cpu.yaml with --tiny). Locally it runs with
`--nproc-per-node N`: agpo's own launcher starts the ranks, forwards signals and exits 75/124/2
(torchrun would exit 1 for all of them). On Slurm each task is one
sbatch job, one srun task per GPU, ranks mapped from SLURM_* by agpo_megatron/runtime/parallel.py; the job
asks for `--signal=USR1@120` and `--requeue`, and nemo-run requeues it on a non-zero exit while
`--retries` allows (a preempted trainer exits 75 after saving; checkpoint.resume defaults to auto).

Departures: "no clip" has no config switch; it is approximated by eps_low=0.999, eps_high=1e6 (the
ratio is then clipped only outside [0.001, 1e6]) with adaptive clipping off. An exact switch needs
a new field (e.g. algo.loss.clip: false). Gamma 0.1 is the `agpo` task itself.

NOTE: nemo-run 0.11.1 rewrites "/nemo_run" anywhere in a non-container Slurm job's paths (its
rundir placeholder), so keep that string out of NEMORUN_HOME, --out and --repo.

exp.run() returns normally even when a task failed, so the script reads every task's final state
and exits 1 if any did not succeed (after writing the comparison of those that did).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # agpo_megatron.config.arms is pure data: no training dependency needed
from agpo_megatron.config.arms import ARMS, parse_arms  # noqa: E402

# A-GRPO over AGPO: symmetric KL with adaptive beta_t, adaptive clip eps_t, entropy bonus (examples/agrpo_qwen7b.yaml).
AGRPO = [
    "algo.loss.kl_coef=0.001",
    "algo.loss.kl_estimator=symmetric",
    "algo.loss.entropy_coef=0.001",
    "algo.adaptive_kl_target=0.01",
    "algo.adaptive_clip=true",
]
TASKS: dict[str, list[str]] = {
    # The paper's three methods (grpo, agpo-m1, agpo) and the baselines (dapo, gspo, rloo, drgrpo):
    # agpo_megatron/config/arms.py, the table the CPU demo's --arms reads too.
    **ARMS,
    # Length-reward weight (the paper's gamma = 0.1 is `agpo`).
    "agpo-gamma0.05": ["algo.gamma=0.05"],
    "agpo-gamma0.2": ["algo.gamma=0.2"],
    # A-GRPO and its ablations.
    "agrpo": AGRPO,
    "agrpo-eps0.1": [*AGRPO, "algo.loss.eps_low=0.1", "algo.loss.eps_high=0.1"],
    # eps_t starts at 0.5, outside the default [0.05, 0.4] clip-controller bounds; 0.8 keeps room to widen (< 1).
    "agrpo-eps0.5": [*AGRPO, "algo.loss.eps_low=0.5", "algo.loss.eps_high=0.5", "algo.clip_controller.eps_max=0.8"],
    "agrpo-beta0.1": [*AGRPO, "algo.loss.kl_coef=0.1"],
    "agrpo-beta1.0": [*AGRPO, "algo.loss.kl_coef=1.0"],
    "agrpo-nokl": [*AGRPO, "algo.loss.kl_coef=0.0", "algo.adaptive_kl_target=null"],
    "agrpo-noentropy": [*AGRPO, "algo.loss.entropy_coef=0.0"],
    "agrpo-noclip": [*AGRPO, "algo.adaptive_clip=false", "algo.loss.eps_low=0.999", "algo.loss.eps_high=1000000.0"],
    "agrpo-G4": [*AGRPO, "algo.group_size=4"],
    "agrpo-G8": [*AGRPO, "algo.group_size=8"],
    "agrpo-G16": [*AGRPO, "algo.group_size=16"],
}
TINY_TASKS = ("grpo", "agpo-m1", "agpo")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def _name(state) -> str:
    """torchx AppState (or a status string) -> its name, e.g. 'SUCCEEDED'."""
    return getattr(state, "name", None) or str(state).rsplit(".", 1)[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--tiny", action="store_true", help=f"examples/tiny_cpu.yaml and only {', '.join(TINY_TASKS)}")
    p.add_argument("--only", nargs="*", help="run these task names only (see --list)")
    p.add_argument("--arms", default=None, help=f"comma-separated arms to run, e.g. grpo,agpo,dapo ({', '.join(ARMS)})")
    p.add_argument("--list", action="store_true", help="print the tasks and exit")
    p.add_argument("--title", default=None, help="experiment title (default paper_ablation[_tiny])")
    p.add_argument("--out", default=None, help="run directories go to OUT/<task> (default runs/sweeps/<title>)")
    p.add_argument("--repo", default=str(REPO), help="repo root as the job sees it (configs, PYTHONPATH)")
    p.add_argument("--python", default=None, help="training interpreter (default REPO/.venv/bin/python if present)")
    p.add_argument("--nproc", type=int, default=None, help="ranks per node = GPUs per node (default 8; --tiny 2)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override steps (--tiny default: 2)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value applied to every task")
    s = p.add_argument_group("slurm")
    s.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT", "local"))
    s.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"))
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--gpus-per-node", type=int, default=None, help="default: --nproc; 0 = CPU tasks (gloo)")
    s.add_argument("--cpus-per-task", type=int, default=None, help="default 12; --tiny 1")
    s.add_argument("--retries", type=int, default=3, help="requeues after a non-zero exit (preemption)")
    s.add_argument("--container-image", default=None, help="pyxis/enroot image (optional)")
    s.add_argument("--container-mounts", nargs="*", default=[])
    s.add_argument("--ssh-host", default=None, help="submit over SSH (run.SSHTunnel) instead of LocalTunnel")
    s.add_argument("--ssh-user", default=os.environ.get("USER", ""))
    s.add_argument("--remote-dir", default=None, help="SSH: nemo-run's job directory on the cluster")
    args = p.parse_args(argv)
    args.title = args.title or ("paper_ablation_tiny" if args.tiny else "paper_ablation")
    args.out = os.path.abspath(args.out or os.path.join("runs", "sweeps", args.title))
    args.nproc = args.nproc or (2 if args.tiny else 8)
    args.cpus_per_task = args.cpus_per_task or (1 if args.tiny else 12)
    args.gpus_per_node = args.nproc if args.gpus_per_node is None else args.gpus_per_node
    venv = Path(args.repo, ".venv", "bin", "python")
    args.python = args.python or (str(venv) if venv.exists() else sys.executable)
    if args.tiny and args.steps is None:
        args.steps = 2
    return args


def task_list(args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> full override list (the base config is fixed by --tiny)."""
    try:
        arms = parse_arms(args.arms) if args.arms else []
    except ValueError as e:
        sys.exit(f"--arms: {e}")
    names = list(dict.fromkeys([*(args.only or []), *arms])) or list(TINY_TASKS if args.tiny else TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; --list shows {list(TASKS)}")
    common = [f"steps={args.steps}"] if args.steps is not None else []
    return {
        n: [
            *TASKS[n],
            *common,
            *args.overrides,
            f"logging.out_dir={args.out}/{n}",
            f"checkpoint.save_dir={args.out}/{n}/checkpoints",
        ]
        for n in names
    }


def executor(args: argparse.Namespace, run):
    env = {"PYTHONPATH": args.repo, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.cpus_per_task)}
    if args.gpus_per_node == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.executor == "local":
        # One process per task: `agpo train --nproc-per-node` (main) starts the ranks itself.
        return run.LocalExecutor(ntasks_per_node=1, env_vars=env)
    if args.ssh_host:
        # Submits from this machine over SSH; REPO and PYTHON must be paths on the cluster.
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.remote_dir or "nemo_run")
    else:  # already on a login node (or the node that runs slurmctld)
        tunnel = run.LocalTunnel(job_dir=os.path.join(run.config.get_nemorun_home(), "experiments"))
    return run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        time=args.time,
        nodes=args.nodes,
        ntasks_per_node=args.nproc,
        gpus_per_node=args.gpus_per_node or None,
        cpus_per_task=args.cpus_per_task,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        env_vars=env,
        signal="USR1@120",
        additional_parameters={"requeue": True},
        retries=args.retries,
        tunnel=tunnel,
        packager=run.Packager(),  # the code is already on the cluster (args.repo)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = os.path.join(args.repo, "examples", "tiny_cpu.yaml" if args.tiny else "agpo_qwen7b.yaml")
    tasks = task_list(args)
    if args.list:
        for name, overrides in tasks.items():
            print(f"{name}: {shlex.join(overrides)}")
        return 0
    import nemo_run as run  # only here: --list works without the launch extra

    with run.Experiment(args.title, log_level="WARN") as exp:
        for name, overrides in tasks.items():
            # Locally agpo's launcher starts the ranks; on Slurm srun does (one task per GPU).
            launch = ["--nproc-per-node", str(args.nproc)] if args.executor == "local" else []
            script = run.Script(
                path="agpo_megatron.cli",
                args=["train", *launch, "--config", base, *overrides],
                m=True,
                entrypoint=args.python,
            )
            exp.add(script, executor=executor(args, run), name=name)
        # Local: one task at a time (they share the machine). Slurm: all queued at once, no afterok
        # chain, so one failed task does not cancel the rest.
        exp.run(sequential=args.executor == "local")
    # NOTE: for Slurm, run() returns once the jobs are queued; leaving the `with` block waits for them.
    states = {job.id: _name(getattr(job, "state", None)) for job in exp.jobs}  # what the wait saw
    if any(s not in TERMINAL for s in states.values()):
        # exp.status() is no better for LocalExecutor (it reported a finished task as RUNNING in
        # our runs); on Slurm it asks sacct (scripts/sacct stands in where there is no slurmdbd).
        try:
            reported = exp.status(return_dict=True) or {}
            states.update({n: _name(d["status"]) for n, d in reported.items() if states.get(n) not in TERMINAL})
        except Exception as e:  # status must not hide the tasks' own result
            print(f"exp.status failed: {e}", file=sys.stderr)

    done = [n for n in tasks if os.path.isfile(os.path.join(args.out, n, "metrics.jsonl"))]
    if done:
        subprocess.run(
            [
                args.python,
                "-m",
                "agpo_megatron.cli",
                "compare",
                *[os.path.join(args.out, n) for n in done],
                "-o",
                os.path.join(args.out, "compare"),
            ],
            env={**os.environ, "PYTHONPATH": args.repo},
            check=False,
        )
    failed = {n: s for n, s in states.items() if s != "SUCCEEDED"}
    print("tasks: " + ", ".join(f"{n} {s}" for n, s in states.items()))
    if failed:
        print(f"sweep failed: {len(failed)} of {len(states)} task(s) did not succeed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
