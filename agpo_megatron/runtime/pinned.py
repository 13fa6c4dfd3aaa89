"""Pinned host memory without the caching allocator's power-of-two rounding (issue 18 item 2).

PyTorch's CachingHostAllocator (behind `torch.empty(..., pin_memory=True)`) rounds every request
up to the next power of two, and its rounding threshold defaults to SIZE_MAX: one pinned buffer
per storage turns a 259 MiB fc1 into 512 MiB and a 1.02 GiB embedding into 2 GiB (about 27 GiB
pinned per rank for a 7B Reference at TP=1 instead of 14.2). Page-locked memory that large, times
eight ranks a node, can exhaust the host.

So a stash asks for slabs whose sizes are already powers of two: as many `SLAB_BYTES` slabs as fit,
then the binary decomposition of the rest rounded up to `MIN_SLAB_BYTES`. The allocator has nothing
to round; what is allocated is the stash's bytes plus less than `MIN_SLAB_BYTES`. Storages are
laid end to end over the slabs (one may span two), each copied piecewise.
"""

from __future__ import annotations

import dataclasses

import torch

SLAB_BYTES = 1 << 30
"""The full slab: a power of two, large enough that a stash needs few of them."""
MIN_SLAB_BYTES = 2 << 20
"""The smallest tail slab; the most a stash over-allocates."""


def allocator_bytes(request: int) -> int:
    """What the CachingHostAllocator really pins for one request of `request` bytes (power-of-two rounding)."""
    return 1 << max(0, request - 1).bit_length() if request > 0 else 0


def slab_sizes(total: int) -> list[int]:
    """Power-of-two slab sizes, largest first, that hold `total` bytes with less than `MIN_SLAB_BYTES` to spare."""
    slab, min_slab = SLAB_BYTES, MIN_SLAB_BYTES
    assert slab & (slab - 1) == 0 and min_slab & (min_slab - 1) == 0 and min_slab <= slab
    full, rest = divmod(total, slab)
    sizes = [slab] * full
    rest = -(-rest // min_slab) * min_slab
    bit = slab >> 1
    while rest:
        if rest >= bit:
            sizes.append(bit)
            rest -= bit
        bit >>= 1
    return sizes


def pinned_bytes(total: int) -> int:
    """Host bytes a stash of `total` bytes pins (the planner's figure): slabs the allocator keeps as they are."""
    return sum(allocator_bytes(s) for s in slab_sizes(total))


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of one storage's bytes inside one slab."""

    slab: int
    """Index of the slab."""
    slab_offset: int
    """Byte offset in that slab."""
    offset: int
    """Byte offset in the storage."""
    nbytes: int
    """Length of the run."""


def place(sizes: list[int], slabs: list[int]) -> list[list[Piece]]:
    """The storages of `sizes` bytes laid end to end over slabs of `slabs` bytes: each storage's pieces."""
    out: list[list[Piece]] = []
    k, used = 0, 0
    for n in sizes:
        pieces, done = [], 0
        while done < n:
            if used == slabs[k]:
                k, used = k + 1, 0
            take = min(n - done, slabs[k] - used)
            pieces.append(Piece(k, used, done, take))
            used, done = used + take, done + take
        out.append(pieces)
    return out


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:  # [nbytes] uint8
    """The storage's bytes as a uint8 tensor (a view: writes land in the storage)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
