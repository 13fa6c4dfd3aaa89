"""2-rank worker: after set_collective_timeout(2), a collective whose peer is 8 s late fails on rank 0.

Prints "TIMEOUT <seconds> <groups>" from rank 0 when its all-reduce raised, "NOTIMEOUT" otherwise.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from agpo_megatron.runtime.parallel import comm_device, init_model_parallel, set_collective_timeout

layout = init_model_parallel(1, 1, seed=0)
groups = set_collective_timeout(2.0)
if layout.rank == 1:
    time.sleep(8)
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(1, device=comm_device()))
    line = "NOTIMEOUT"
except RuntimeError:
    line = f"TIMEOUT {time.monotonic() - t0:.1f} {groups}"
if layout.rank == 0:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
sys.stdout.flush()
os._exit(0)  # the world is broken after a timeout: no barrier
