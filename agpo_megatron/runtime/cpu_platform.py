"""Run real megatron-core (0.16.1 to 0.19.x) on a CPU-only machine with gloo.

megatron-core assumes CUDA in a handful of places. Nothing here changes numerics; each
redirection only tells Megatron "the device is the CPU". The layer is active only when
`torch.cuda.is_available()` is False, so on a GPU machine `activate()` does nothing.

The redirections, and why each is needed:

1. `torch.cuda.current_device()` -> `torch.device("cpu")`.
   Megatron passes it as `device=` when it allocates the param/grad buffers, rotary
   `inv_freq` (moved at the first forward), and more (about 100 call sites). Patched process-wide:
   it costs nothing per op, and nothing but Megatron asks for a CUDA device on a CPU box.

2. The CUDA RNG tracker (`tensor_parallel/random.py`). `model_parallel_cuda_manual_seed`
   registers per-TP-rank RNG states with `torch.cuda.get_rng_state/manual_seed` and
   swaps them with the module's `_get_cuda_rng_state/_set_cuda_rng_state`; attention dropout
   `fork()`s that tracker. On CPU the "device generator" *is* the default CPU generator,
   so all of those are served by `torch.get_rng_state/set_rng_state/manual_seed`. Megatron then
   warns "CPU RNG state changed within GPU RNG context"; that is expected here.

3. `device="cuda"` literals in factory calls (`torch.zeros(..., device="cuda")` in the 1F1B
   token counter, grad clipping, the optimizer's found_inf/scale buffers, the DDP buffer
   warm-up) and `Tensor.cuda()` / `.to("cuda")`. A `TorchFunctionMode` rewrites those to CPU.
   NOTE: a TorchFunctionMode sees *every* torch call (about +2 us per op measured here, 1.5x on
   tiny ops), and vLLM's decode loop would pay it too. So it is not global: `megatron_scope()`
   enters it only around the Megatron calls that need it (model/DDP/optimizer build, the
   forward-backward schedule, the optimizer step, checkpointing).

4. `Tensor.type()` strings. The (distributed) optimizer and grad clipping assert
   `param.type() == "torch.cuda.FloatTensor"`; inside `megatron_scope()` the mode answers the
   CUDA spelling for CPU tensors (only for the no-argument form, which is the query).

5. `torch.cuda.synchronize()` -> no-op. The pipeline p2p exchange syncs the device after
   `batch_isend_irecv`; CPU ops are already synchronous, so there is nothing to wait for.

6. `torch.cuda.current_stream()` -> `torch.cpu.current_stream()`. megatron-core 0.19's DDP
   grad sync asks for the current stream to wait on CUDA-graph events (none exist on CPU).
   The CPU stream has the same `wait_event`/`wait_stream` methods, and they do nothing.

7. Mixture-of-experts (issue 23). `moe_utils` names `te_general_gemm` only when Transformer
   Engine imports, and its router linear tests `te_general_gemm is not None`: without TE that is
   a NameError, so the name is bound to None (the plain matmul path). The all-to-all token
   dispatcher copies its routing counts to the host on a side CUDA stream
   (`MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`) and waits on an event of it; on CPU the copy
   is already synchronous, so the stream is a stand-in whose events are complete at once.

Also: pass an explicit causal `attention_mask` to GPTModel: Megatron's default mask is built
with `device="cuda"` outside any place we can scope cheaply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False

# Factory functions whose `device=` kwarg Megatron sets to "cuda".
_FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.as_tensor,
    torch.eye,
    torch.linspace,
}


def cuda_present() -> bool:
    """The single condition that decides whether the layer may activate."""
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU and answers `Tensor.type()` in CUDA spelling."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = torch.cuda.manual_seed
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state


class _DoneEvent:
    """An event that has already happened (CPU work is synchronous)."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class _HostStream:
    """Stands in for the dispatcher's CUDA side stream: everything on it is already done."""

    def record_event(self, event: Any = None) -> _DoneEvent:
        return _DoneEvent()

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


def _patch_moe() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    if not getattr(moe_utils, "HAVE_TE", False):
        moe_utils.te_general_gemm = None
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HostStream()


def activate() -> bool:
    """Install the process-wide redirections (1, 2, 5, 6, 7). Returns whether the layer is active.

    A no-op when CUDA is present, and a no-op when called a second time.
    """
    global _ACTIVE
    if _ACTIVE or cuda_present():
        return _ACTIVE
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    _patch_rng()
    _patch_moe()
    _ACTIVE = True
    return True


@contextlib.contextmanager
def megatron_scope() -> Iterator[None]:
    """Enter around Megatron calls that allocate on "cuda" (redirections 3, 4).

    Re-entrant, and a no-op on GPU. Activates the process-wide part on first use.
    """
    if not activate():
        yield
        return
    with _CudaToCpuMode():
        yield


def default_device() -> torch.device:
    """Where this process's model lives: the local GPU, else the CPU."""
    if cuda_present():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
