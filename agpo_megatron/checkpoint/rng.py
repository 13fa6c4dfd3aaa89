"""Each rank's RNG states in a step checkpoint: save what exact resume needs, restore it.

A step folder holds `rng/rank_NNNNN.pt` per rank (`train/run_checkpoint.py` writes and checksums
them): torch CPU, CUDA (when present), Megatron's model-parallel tracker, python `random` and numpy.
They are stored in types `torch.load(weights_only=True)` accepts, so loading one runs no pickle code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agpo_megatron.runtime import cpu_platform

RNG_DIR = "rng"
"""The folder of the per-rank RNG files inside a step checkpoint."""


def rng_state() -> dict[str, Any]:
    """This rank's RNG states, in types `torch.load(weights_only=True)` accepts."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "megatron_tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if cpu_platform.cuda_present():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["megatron_tracker"]))
    if "cuda" in state and cpu_platform.cuda_present():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    """Where `rank` keeps its RNG states inside a step folder."""
    return folder / RNG_DIR / f"rank_{rank:05d}.pt"
