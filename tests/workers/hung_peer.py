"""2-rank worker: all-reduces in a loop under a StepWatchdog; the test SIGSTOPs rank 1.

Prints "PID <rank> <pid>" and then "STEP <rank> <i>" per step.
"""

import os
import sys

import torch
import torch.distributed as dist

from agpo_megatron.report.metrics import PhaseTimer
from agpo_megatron.runtime.parallel import comm_device, init_distributed
from agpo_megatron.runtime.watchdog import StepWatchdog

init_distributed(timeout_s=3600)  # the process-group timeout alone would block for an hour
rank = dist.get_rank()
sys.stdout.write(f"PID {rank} {os.getpid()}\n")  # one write: the ranks share the pipe
sys.stdout.flush()
timer = PhaseTimer(cuda=False)
wd = StepWatchdog(float(sys.argv[1]), phase=lambda: timer.current, rank=rank).start()
for i in range(100_000):
    with timer("update"):
        t = torch.ones(1, device=comm_device())
        dist.all_reduce(t)
    wd.beat()
    if i % 50 == 0:
        sys.stdout.write(f"STEP {rank} {i}\n")
        sys.stdout.flush()
