"""The reader behind `convert_io.ParamReader`: torch DCP's reader, with chunks read whole going
straight from the `.distcp` file into their destination (see `DirectReader`).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, LoadPlan
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from agpo_megatron.checkpoint import CheckpointError


class DirectReader(FileSystemReader):
    """torch DCP's reader, except that a chunk read whole goes straight into its destination.

    NOTE: the stock reader `torch.load`s every stored chunk into fresh memory and then copies
    it into the destination: two passes, one of them over fresh pages. When a chunk is read
    whole, into a contiguous destination of its own dtype, this reads the tensor bytes of its
    `torch.save` record (an uncompressed zip member) in place instead. Everything else, such as a
    chunk narrowed for resharding or a cast, takes the stock path. The metadata is read once.
    """

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata

    def read_data(self, plan, planner) -> Future:
        stock = []
        for req in plan.items:
            target = self._whole_chunk_target(req, planner)
            if target is None:
                stock.append(req)
                continue
            info = self.storage_data[req.storage_index]
            with open(os.path.join(self.path, info.relative_path), "rb", buffering=0) as f:
                try:
                    start = _record_data_offset(f, info.offset, info.length, target.nbytes)
                except (zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
                    raise CheckpointError(
                        f"{self.path / info.relative_path}: chunk of {req.storage_index.fqn!r} "
                        f"at byte {info.offset} is corrupt ({e})"
                    ) from None
                if start is None:
                    stock.append(req)
                    continue
                f.seek(start)
                view = memoryview(target.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != target.nbytes:
                    raise CheckpointError(
                        f"{self.path / info.relative_path}: chunk of {req.storage_index.fqn!r} is truncated"
                    )
            planner.commit_tensor(req, target)
        if stock:
            try:
                return super().read_data(LoadPlan(stock), planner)
            except Exception as e:
                info = self.storage_data[stock[0].storage_index]
                raise CheckpointError(
                    f"{self.path / info.relative_path}: cannot read chunk(s) of "
                    f"{stock[0].storage_index.fqn!r} ({type(e).__name__}: {e})"
                ) from None
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _whole_chunk_target(self, req, planner) -> torch.Tensor | None:
        if req.type != LoadItemType.TENSOR or any(req.storage_offsets):
            return None
        md = self._metadata.state_dict_metadata[req.storage_index.fqn]
        chunk = next((c for c in md.chunks if c.offsets == req.storage_index.offset), None)
        if chunk is None or tuple(chunk.sizes) != tuple(req.lengths):
            return None
        target = planner.resolve_tensor(req).detach()
        if not target.is_contiguous() or target.dtype != md.properties.dtype:
            return None
        return target


def _record_data_offset(f, offset: int, length: int, nbytes: int) -> int | None:
    """File offset of the tensor bytes in the `torch.save` record at [offset, offset + length),
    or None unless the record holds exactly one uncompressed storage of `nbytes` bytes."""
    with zipfile.ZipFile(_Window(f, offset, length)) as z:
        data = [i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")]
    if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or data[0].file_size != nbytes:
        return None
    f.seek(offset + data[0].header_offset)
    local = f.read(30)  # the local header's name and extra lengths can differ from the central one
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return offset + data[0].header_offset + 30 + name_len + extra_len


class _Window(io.RawIOBase):
    """A read-only, seekable view of [offset, offset + length) of a file."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got
