"""Launch a test worker under torchrun (gloo on CPU) with a hard timeout, so a hang fails the test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agpo_megatron.runtime.parallel import torchrun_cmd

WORKERS = Path(__file__).parent / "workers"


def torchrun(worker: str, *args: str, nproc: int = 2, timeout: int = 300) -> str:
    """Run tests/workers/<worker> on `nproc` ranks; returns combined output, raises on failure."""
    cmd = torchrun_cmd(nproc, str(WORKERS / worker), *map(str, args))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{worker} timed out after {timeout}s\n{out[-4000:]}") from None
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{worker} exited {proc.returncode}\n{out[-6000:]}")
    return out


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
