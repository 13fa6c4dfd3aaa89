"""Park Megatron state in host memory while vLLM generates (verl's offload, for colocated RL).

What moves, by `OffloadConfig` flag:
- `params`: the storages behind the model's parameters (with Megatron DDP + the distributed
  optimizer: the one contiguous `param_data` buffer per dtype that every parameter is a view of)
  and the optimizer's main params that are tensors of their own (the fp32 copies of a bf16 model);
- `grads`: the DDP grad buffers behind every `main_grad`, and any `.grad` left on a main param.
  Discarded, not copied: every train step starts with `zero_grad_buffer()` and
  `optimizer.zero_grad()`, so a reload only re-allocates them (zero-filled);
- `optimizer`: every tensor of the optimizer's state on the params' device (Adam's moments).

How. The *storage* is freed (`untyped_storage().resize_(0)`) and later re-sized and refilled; no
tensor is ever swapped for a host one (`p.data = p.data.cpu()`). Megatron's parameters and
`main_grad`s are views into DDP's buffers, and so are the distributed optimizer's fp32 shards of
an fp32 model: swapping one tensor would silently cut it loose from the buffer the grad
all-reduce and the optimizer write into. NOTE: Megatron's own `MegatronOptimizer.offload_to_cpu`
swaps `p.data` of the optimizer's params, which alias the DDP buffer when the model is fp32, so it
is not used here. A freed storage keeps every view valid (they read it again once it is re-sized).
Host copies are allocated once, pinned when the device is CUDA, and reused on every offload;
they are power-of-two slabs, so the pinned allocator does not round them up (runtime/pinned.py).
The Reference's stash is frozen: copied to host once, only freed afterwards.

On CPU the device *is* the host: an offload copies into a second host buffer and frees the
first. That is wasted work for a real CPU run (leave the flags off), but it runs the exact GPU
code path, so the CPU tests check it (storage freed, restored bit-exact, training unchanged).

NOTE: while offloaded, a tensor's storage has 0 bytes and reading it is undefined (on CPU it
segfaults; nothing checks the bounds). Whatever reads Megatron state must run in the train phase:
a checkpoint save brings the actor back first, with vLLM asleep (train/colocate.py `actor_resident`).

Not handled (refused with an error, or left in place):
- storages PyTorch cannot resize (memory it did not allocate, e.g. NCCL user-buffer registration,
  `ddp_config.nccl_ub`): refused, naming the tensor;
- a grad buffer that shares its storage with params (MXFP8's `reuse_grad_buf_for_mxfp8_param_ag`):
  refused, since discarding the grads would discard the weights;
- tensors on another device than the params (Adam's `step` counter lives on host): left in place;
- Transformer Engine's FP8 weight caches (transposes, amax history in `_extra_state`): not moved.

GPU status: docs/gpu-status.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from agpo_megatron.config.model import OffloadConfig
from agpo_megatron.runtime import pinned


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostStash:
    """A set of device storages that can be parked in host memory and brought back.

    Built from any tensors (views included); each distinct storage is handled once. With
    `keep=False` the contents are discarded and `reload()` zero-fills the storage. With
    `frozen=True` (the Reference: its weights never change) the host copy made by the first
    offload stays valid, and later offloads only free the device storages.

    Host memory: power-of-two slabs, the storages laid end to end over them (runtime/pinned.py),
    so pinning does not double it. Allocated once, at the first offload, and reused.
    """

    def __init__(
        self, tensors: Iterable[torch.Tensor], *, keep: bool = True, frozen: bool = False, what: str = "tensors"
    ):
        self.keep, self.frozen, self.what = keep, frozen, what
        self._storages: list[torch.UntypedStorage] = []
        self._nbytes: list[int] = []
        seen: set[int] = set()
        for t in tensors:
            s = t.untyped_storage()
            if s.nbytes() == 0 or s._cdata in seen:  # noqa: SLF001 (the StorageImpl's identity)
                continue
            if not s.resizable():
                raise RuntimeError(
                    f"offload: cannot free a {what} storage of {s.nbytes()} bytes on {s.device}: "
                    "PyTorch did not allocate it (e.g. NCCL user buffers); turn this offload off"
                )
            seen.add(s._cdata)  # noqa: SLF001
            self._storages.append(s)
            self._nbytes.append(s.nbytes())
        self._slab_sizes = pinned.slab_sizes(self.nbytes) if keep else []
        self._pieces = pinned.place(self._nbytes, self._slab_sizes) if keep else []
        self._slabs: list[torch.Tensor] = []
        self._host_valid = False  # the slabs hold the current contents (frozen stashes only rely on it)
        self.on_host = False
        self.copies_to_host = 0
        """Offloads that copied the storages to host (a frozen stash: one in its life)."""
        self.reloads = 0
        """Reloads that brought the storages back to the device."""

    @property
    def nbytes(self) -> int:
        """Device bytes this stash frees when offloaded."""
        return sum(self._nbytes)

    @property
    def host_requests(self) -> list[int]:
        """The sizes of the host buffers this stash allocates (its slabs; none when discarding)."""
        return list(self._slab_sizes)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes the slabs take once the caching host allocator has rounded them (as requested)."""
        return sum(pinned.allocator_bytes(n) for n in self._slab_sizes)

    def storage_ids(self) -> set[int]:
        return {s._cdata for s in self._storages}  # noqa: SLF001

    def offload(self) -> None:
        """Copy to host (unless discarding, or frozen and copied before), then free the device storages. Idempotent."""
        if self.on_host or not self._storages:
            self.on_host = True
            return
        device = self._storages[0].device
        if self.keep and not (self.frozen and self._host_valid):
            if not self._slabs:
                pin = device.type == "cuda"
                self._slabs = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in self._slab_sizes]
            for s, pieces in zip(self._storages, self._pieces):
                src = pinned.byte_view(s)
                for p in pieces:
                    dst = self._slabs[p.slab][p.slab_offset : p.slab_offset + p.nbytes]
                    dst.copy_(src[p.offset : p.offset + p.nbytes], non_blocking=True)
            self.copies_to_host += 1
            self._host_valid = True
        _sync(device)  # the copies must land before the memory can be reused
        for s in self._storages:
            s.resize_(0)
        self.on_host = True

    def reload(self) -> None:
        """Re-allocate the device storages and refill them (zeros when discarding). Idempotent."""
        if not self.on_host:
            return
        for i, s in enumerate(self._storages):
            s.resize_(self._nbytes[i])
            if self.keep:
                dst = pinned.byte_view(s)
                for p in self._pieces[i]:
                    src = self._slabs[p.slab][p.slab_offset : p.slab_offset + p.nbytes]
                    dst[p.offset : p.offset + p.nbytes].copy_(src, non_blocking=True)
            else:
                s.fill_(0)
        if self._storages:
            _sync(self._storages[0].device)
            self.reloads += 1
        self.on_host = False

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """On the device inside the block, back on host after it (if it was there before)."""
        was_on_host = self.on_host
        self.reload()
        try:
            yield
        finally:
            if was_on_host:
                self.offload()


def megatron_optimizers(optimizer: Any) -> list[Any]:
    """The MegatronOptimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def actor_tensors(chunks: list[torch.nn.Module], optimizer: Any) -> dict[str, list[torch.Tensor]]:
    """The actor's device tensors, grouped as `OffloadConfig` names them (views and duplicates included)."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    device = params[0].device
    grads = [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
    state: list[torch.Tensor] = []
    for opt in megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:  # main params: fp32 copies, or views of the model's own
            for p in group["params"]:
                if p.device == device:
                    params.append(p)
                if p.grad is not None and p.grad.device == device:
                    grads.append(p.grad)
        for per_param in inner.state.values():
            state.extend(v for v in per_param.values() if isinstance(v, torch.Tensor) and v.device == device)
    return {"params": params, "grads": grads, "optimizer": state}


class ActorMemory:
    """The actor's state that `OffloadConfig` parks on host during rollout (no-op when all flags are off).

    `offload_train_state()` (grads, optimizer) before vLLM's weights come back, `offload_params()`
    after the weight sync (the sync reads the params), `reload()` once vLLM sleeps again.
    """

    def __init__(self, chunks: list[torch.nn.Module], optimizer: Any, cfg: OffloadConfig):
        self._chunks, self._optimizer = chunks, optimizer
        self._enabled = {"params": cfg.params, "grads": cfg.grads, "optimizer": cfg.optimizer}
        self.stashes = {name: HostStash([]) for name in self._enabled}
        self._refresh(*self._enabled)  # refuses an unsupported layout now, not mid-run

    def _refresh(self, *names: str) -> None:
        """Re-collect the tensors: Adam creates its moments at the first step, and a main param's
        `.grad` is re-assigned every step. A stash is rebuilt only when its storages changed, so
        the (pinned) host buffers are allocated once."""
        if not any(self._enabled[n] for n in names):
            return
        groups = actor_tensors(self._chunks, self._optimizer)
        if self._enabled["grads"]:
            shared = HostStash(groups["grads"]).storage_ids() & HostStash(groups["params"]).storage_ids()
            if shared:
                raise RuntimeError(
                    "offload.grads: the grad buffer shares storage with the params (e.g. MXFP8's "
                    "param all-gather reuses it), so discarding grads would discard weights; "
                    "turn offload.grads off"
                )
        for name in names:
            if not self._enabled[name] or self.stashes[name].on_host:
                continue
            fresh = HostStash(groups[name], keep=name != "grads", what=name)
            if fresh.storage_ids() != self.stashes[name].storage_ids():
                self.stashes[name] = fresh

    def offload_train_state(self) -> None:
        """Grads and optimizer state to host (before vLLM's weights come back)."""
        self._refresh("grads", "optimizer")
        self.stashes["grads"].offload()
        self.stashes["optimizer"].offload()

    def offload_params(self) -> None:
        """Params and main params to host (after the weight sync has read them)."""
        self._refresh("params")
        self.stashes["params"].offload()

    def reload(self, *, grads: bool = True) -> None:
        """Everything back on the device, before the first forward of the train phase.
        `grads=False` (a checkpoint save): the grad buffers stay freed, nothing reads them."""
        for name, stash in self.stashes.items():
            if grads or name != "grads":
                stash.reload()
