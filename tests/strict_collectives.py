"""A test guard for the collective-device rule: every tensor this package hands to a collective
lives on `parallel.comm_device(group)`.

On CPU the rule cannot fail by itself (gloo's device *is* the CPU), so the guard makes the mistake
visible: tensors made by a factory call without an explicit `device=` (the pattern that put a CPU
tensor into NCCL's all-reduce, issue 8 D1) are tagged, and a collective called from
`agpo_megatron` code with a tagged tensor, or with one off the group's comm device, raises.
Tensors derived from model activations carry no tag; on GPU they live on the model's device,
which is the comm device.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from agpo_megatron.runtime.parallel import comm_device

_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.eye,
    torch.linspace,
}
_TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_to_all_single",
)


class _TagImplicitDevice(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            out._agpo_implicit_device = True
        return out


class CollectiveDeviceError(AssertionError):
    pass


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


@contextlib.contextmanager
def strict_collectives():
    """Within the block, collectives called from agpo_megatron reject tensors off the comm device.

    Yields the list of (collective name, caller module) pairs that were checked.
    """
    checked: list[tuple[str, str]] = []
    originals = {name: getattr(dist, name) for name in _TENSOR_COLLECTIVES}

    def wrap(name, fn):
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("agpo_megatron"):
                group = kwargs.get("group")
                want = comm_device(group)
                for t in _tensors(list(args) + list(kwargs.values())):
                    if getattr(t, "_agpo_implicit_device", False) or t.device != want:
                        raise CollectiveDeviceError(
                            f"dist.{name} from {caller}: tensor on {t.device} made without an explicit device; "
                            f"collectives need tensors on parallel.comm_device() = {want}"
                        )
                checked.append((name, caller))
            return fn(*args, **kwargs)

        return guarded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        with _TagImplicitDevice():
            yield checked
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
