"""checkpoint/rng.py: a rank's RNG states survive a save and a load (exact resume depends on it)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


_RNG = """
import random, numpy as np, torch
from agpo_megatron.runtime import cpu_platform as cpu
cpu.activate()
from megatron.core import tensor_parallel
from agpo_megatron.checkpoint.rng import rng_state, set_rng_state
tracker = tensor_parallel.get_cuda_rng_tracker()
tracker.add("model-parallel-rng", 7)
def draw():
    with tracker.fork():
        a = torch.rand(3).tolist()
    return torch.rand(3).tolist(), a, random.random(), float(np.random.rand())
torch.save(rng_state(), "{path}")
first = draw()
draw()
set_rng_state(torch.load("{path}", weights_only=True))
assert draw() == first, "RNG state not restored"
print("ok")
"""


@pytest.mark.slow
def test_rng_states_round_trip_through_a_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _RNG.format(path=tmp_path / "rng.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
