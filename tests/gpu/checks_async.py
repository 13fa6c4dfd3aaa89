"""Smoke section of issue 21 (asynchronous RL): the trainer -> rollout link of a disaggregated run.

- disaggregated_link: 3 ranks (2 trainer ranks, 1 rollout rank with a stand-in engine,
  tests/workers/remote_rollout.py): the world split, bucketed weights arriving bit for bit with
  their version, completions tagged with it, on NCCL between the sides on GPU.

On GPU it needs 3 devices: NCCL refuses two ranks of one communicator on the same device, so 1
trainer + 1 rollout rank cannot share a single GPU; with fewer it SKIPs, saying so. The cpu-logic
mode runs the same worker over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.gpu.common import Ctx, Skip, check, judge, require_attrs

REPO = Path(__file__).resolve().parents[2]


def prepare(ctx: Ctx) -> dict:
    from agpo_megatron.rollout import remote
    from agpo_megatron.runtime import parallel, placement

    require_attrs(placement, "split_world", "side_of", "Link", "LinkError")
    require_attrs(placement.Link, "broadcast", "broadcast_object", "set_timeout")
    require_attrs(remote.RemoteRollout, "submit", "collect", "update_weights", "close")
    require_attrs(remote, "serve")
    require_attrs(parallel, "comm_device", "torchrun_cmd")
    return {}


def run_disaggregated_link(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.runtime.parallel import torchrun_cmd

    with check(ctx, "disaggregated_link"):
        if ctx.gpu and torch.cuda.device_count() < 3:
            raise Skip(
                f"{torch.cuda.device_count()} visible GPU(s): the 2 trainer + 1 rollout ranks need 3 (NCCL refuses "
                "two ranks of one communicator on one device)"
            )
        out = ctx.workdir() / "link"
        out.mkdir(parents=True, exist_ok=True)
        path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        cmd = torchrun_cmd(3, str(REPO / "tests" / "workers" / "remote_rollout.py"), str(out), "ok")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        r = [json.loads((out / f"rank{i}.json").read_text()) for i in range(3)]
        loads = r[2]["loads"]
        status, why = judge(
            exit_code=proc.returncode == 0,
            split=[(x["role"], x["side_world"]) for x in r] == [("trainer", 2), ("trainer", 2), ("rollout", 1)],
            completions=r[0]["first"] == r[1]["first"] == [[[1, 2, 11], 0], [[3, 11], 0]],
            version_tags=r[0]["second"] == [[[4, 4, 12], 1]],
            weights_once_per_version=len(loads) == 2,
            served=r[2]["served"]
            == 5,  # weights, generate, weights, generate, partial (tests/workers/remote_rollout.py)
        )
        ctx.report("disaggregated_link", status, **why, backend="nccl" if ctx.gpu else "gloo")
