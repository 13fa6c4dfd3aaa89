"""Preemption: SIGTERM / SIGUSR1 ask the run to save at the next step boundary and exit 75.

Slurm sends SIGTERM before it kills a job (and SIGUSR1 `--signal=USR1@120` seconds ahead when asked);
so do most schedulers. The handler only sets a flag. The loop calls `requested()` once per step:
one all-reduce (MAX) of the flag, so every rank stops after the same step even when only some
ranks got the signal, or got it at different times. The trainer then saves (when
`checkpoint.save_dir` is set) and raises `Preempted`; the CLI exits with `EXIT_PREEMPTED`, which
tells a requeueing job script that the run stopped cleanly and can resume with `checkpoint.resume=auto`.

NOTE: the handlers are installed with `siginterrupt(sig, False)` (SA_RESTART): a blocking system
call in a C++ library (gloo's sockets, a file write) is restarted after the handler instead of
failing with EINTR halfway through a collective.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from agpo_megatron.runtime.parallel import comm_device

EXIT_PREEMPTED = 75
"""Exit code of a preempted run (EX_TEMPFAIL): it saved what it could; run it again to resume."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = False


class Preempted(Exception):
    """Raised by the trainer after it stopped at a step boundary on a signal (and saved, if it can)."""

    def __init__(self, step: int, saved: str | None):
        self.step, self.saved = step, saved
        where = f"saved {saved}" if saved else "nothing saved (checkpoint.save_dir is unset)"
        super().__init__(f"preempted after step {step}: {where}; exiting {EXIT_PREEMPTED}")


def _handler(signum: int, frame) -> None:
    global _requested
    _requested = True
    # os.write, not print: a handler can interrupt print() itself, and print is not reentrant.
    os.write(2, f"[agpo] got {signal.Signals(signum).name}: stopping at the end of this step\n".encode())


def install() -> None:
    """Catch SIGTERM and SIGUSR1 in this process (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)
        signal.siginterrupt(sig, False)


def requested() -> bool:
    """Whether any rank has been signalled. Collective over the world: call it on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _requested
    flag = torch.tensor([1 if _requested else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reset() -> None:
    """Forget a signal (tests, and a process that runs several trainings)."""
    global _requested
    _requested = False
