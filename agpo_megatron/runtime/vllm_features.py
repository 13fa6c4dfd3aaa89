"""What the installed vLLM can do on this machine, checked without importing vLLM or building anything,
so that `agpo train` can refuse a setting up front (`TrainConfig.check_machine`, before any heavy
allocation; config validation itself stays machine-independent).

`routed_experts_unavailable`: vLLM returns the experts it routed each token to (for r3 routing
replay, models/routing.py) only through its AuxOutput connector (`enable_return_routed_experts`,
`CompletionOutput.routed_experts`, vLLM >= 0.32), and that connector lives in Model Runner V2 only,
which vLLM builds only on CUDA with Triton installed; without Triton it falls back to the V1 runner,
which never fills `routed_experts`. So the check is: CUDA, Triton, vLLM >= 0.32, and
`VLLM_USE_V2_MODEL_RUNNER` not set to 0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch


def _vllm_version() -> tuple[int, int] | None:
    try:
        parts = importlib.metadata.version("vllm").split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        return None


def routed_experts_unavailable() -> str | None:
    """Why this machine's vLLM cannot return routed experts (one clause), or None when it can."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device")
    if importlib.util.find_spec("triton") is None:
        missing.append("triton is not installed")
    version = _vllm_version()
    if version is None:
        missing.append("vllm is not installed")
    elif version < (0, 32):
        missing.append(f"vllm {version[0]}.{version[1]} is older than 0.32")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("0", "false"):
        missing.append("VLLM_USE_V2_MODEL_RUNNER=0 is set")
    if not missing:
        return None
    return (
        "vLLM returns routed experts only from its Model Runner V2, which needs CUDA and Triton "
        f"(here: {', '.join(missing)})"
    )
