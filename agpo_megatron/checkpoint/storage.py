"""How the tensors reach the disk: the streaming torch_dist writer that the trainer's save and the
HF converter's save share, and the one-line errors for failures inside torch DCP or Megatron.

NOTE (why not megatron's default writer): `TorchDistSaveShardedStrategy` forks writer processes
and starts a spawn-context Manager even for a synchronous save, and the spawn re-imports
`__main__`. It also resolves every tensor (cloning views, which is every parameter inside DDP's
contiguous buffer) before writing the first byte: a second copy of the rank's state in host
memory. torch's own `FileSystemWriter` keeps every tensor of a file alive until the file is
closed. `_StreamingWriter` writes one file per rank, in the calling thread, one tensor at a time,
and drops each tensor once it is written. That bounded memory is what lets the HF converter
produce tensors lazily (`convert_io.save_from_source`), and the trainer shares the same path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.serialization as torch_serialization
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from agpo_megatron.checkpoint import CheckpointError, checksums
from agpo_megatron.checkpoint.hf_assets import copy_hf_assets
from agpo_megatron.checkpoint.metadata import ASSETS_DIR, SIDECAR, CheckpointMeta, write_meta
from agpo_megatron.runtime import cpu_platform


def sharded_sd_metadata() -> dict[str, Any]:
    """The `metadata` for the model's and the optimizer's `sharded_state_dict`, at save and load.

    These are Megatron-LM's defaults. 'dp_reshardable' stores the distributed optimizer's
    buffers as they are, without a gather, so optimizer state reshards over DP only. The model
    weights reshard over TP/PP/DP; resuming at another TP/PP means loading with optimizer=None.

    NOTE: a fresh dict on every call. Megatron stores the current DP group into the dict it is
    given (`ensure_metadata_has_dp_cp_group`). A shared dict would keep the first layout's DP
    ranks in `replica_id` after the parallel state is rebuilt, and loading then fails its
    access-pattern check.
    """
    return {
        "distrib_optim_sharding_type": "dp_reshardable",
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def mkdir(path: Path) -> None:
    """Create the checkpoint folder (rank 0; the caller decides), or one CheckpointError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the checkpoint folder: {e.strerror or e}") from None


def save_state(state: dict, path: Path, strategy: StreamingSaveStrategy) -> dict[str, dict[str, Any]]:
    """`dist_checkpointing.save`, any failure one CheckpointError naming the file. Collective.

    Returns the checksums of every rank's data file, taken while writing it.
    """
    try:
        with cpu_platform.megatron_scope():
            dist_checkpointing.save(state, str(path), sharded_strategy=strategy)
    except (Exception, CheckpointException) as e:  # NOTE: torch's CheckpointException is a BaseException
        raise checkpoint_error(e, path, "write") from None
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, getattr(strategy, "checksums", {}))
    return {k: v for g in gathered for k, v in g.items()}


def finish(
    path: Path, meta: CheckpointMeta, sums: dict[str, dict[str, Any]], *, hf_assets_from: str | Path | None
) -> None:
    """Rank 0, after the tensors: the HF assets, then the sidecar with a checksum of every file.

    The small files (common.pt, .metadata, metadata.json, assets) are hashed here, after writing.
    """
    try:
        if hf_assets_from is not None:
            copy_hf_assets(hf_assets_from, path / ASSETS_DIR)
        write_meta(path, dataclasses.replace(meta, checksums=checksums.complete(path, sums, skip={SIDECAR})))
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot write: {e.strerror or e}") from None


def checkpoint_error(e: BaseException, path: Path, doing: str) -> CheckpointError:
    """One line for a failure inside torch DCP or Megatron, naming the file where it is known."""
    if isinstance(e, CheckpointException):  # rank -> (exception, traceback)
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        e = next((x for x in errors if isinstance(x, CheckpointError)), errors[0] if errors else e)
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, OSError) and e.filename:
        return CheckpointError(f"{e.filename}: cannot {doing}: {e.strerror or e}")
    what = " ".join(str(e).split())[:400]  # one line, whatever the library's message looks like
    return CheckpointError(f"{path}: cannot {doing} the checkpoint ({type(e).__name__}: {what})")


def leaves(tree) -> Iterator[Any]:
    """The leaves of a nested state dict (dicts, lists and tuples)."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree


# ---- the streaming save strategy ---------------------------------------------------------------


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist format, written synchronously by `_StreamingWriter` (see the module NOTE).

    With `materialize`, tensor data comes from it instead of the state dict
    (`convert_io.save_from_source`).
    NOTE: a subclass of Megatron's torch_dist strategy, not of the abstract base: megatron-core
    0.19 silently replaces any other strategy by its default one (and has no `strategies.base`
    module). Only `save` is used; the async machinery is not.
    """

    def __init__(self, materialize: Callable[[str], torch.Tensor] | None = None):
        super().__init__("torch_dist", 1)
        self.materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        planner_kw = dict(dedup_replicated_tensors=False, flatten_state_dict=False)
        if self.materialize is None:
            planner = MCoreSavePlanner(**planner_kw)
        else:
            # Before `mcore_to_pyt_state_dict`, which reshapes each chunk's `data` in place.
            planner = _MaterializingPlanner(_param_views(sharded_state_dict), self.materialize, **planner_kw)
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        writer = _StreamingWriter(checkpoint_dir)
        dcp.save(mcore_to_pyt_state_dict(by_key, is_loading=False), storage_writer=writer, planner=planner)
        self.checksums = writer.checksums  # this rank's data file, hashed while written


@dataclasses.dataclass(frozen=True)
class _View:
    """Where a stored chunk sits inside its (contiguous) local parameter."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


def view_of(data: torch.Tensor) -> _View:
    return _View(tuple(data.shape), tuple(data.stride()), data.storage_offset())


def _param_views(sharded_state_dict) -> dict[tuple[str, tuple[int, ...]], tuple[str, _View]]:
    """(checkpoint key, global offset) -> the parameter, and the view of it, that a chunk is.

    After factories (SwiGLU splits fc1 into gate and up), a chunk's `data` is a view of the meta
    parameter; its geometry says which part of the materialized parameter to write.
    """
    views = {}
    for name, node in sharded_state_dict["model"].items():
        for sh in leaves(node):
            if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
                views[(sh.key, tuple(sh.global_offset))] = (name, view_of(sh.data))
    return views


class _MaterializingPlanner(MCoreSavePlanner):
    """Resolves tensor write items from `materialize(param)` instead of the (meta) state dict."""

    def __init__(
        self,
        views: dict[tuple[str, tuple[int, ...]], tuple[str, _View]],
        materialize: Callable[[str], torch.Tensor],
        **kw,
    ):
        super().__init__(**kw)
        self.views, self.materialize = views, materialize
        self._name: str | None = None
        self._value: torch.Tensor | None = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        param, view = self.views[(write_item.index.fqn, tuple(write_item.index.offset))]
        if param != self._name:
            # Keep one parameter: SwiGLU's fc1 is written as two chunks (gate, up) back to back.
            self._name, self._value = None, None
            value = self.materialize(param)
            expect = write_item.tensor_data.properties.dtype
            needed = view.storage_offset + sum((n - 1) * s for n, s in zip(view.size, view.stride)) + 1
            if value.dtype != expect or not value.is_contiguous() or value.numel() < needed:
                raise CheckpointError(
                    f"materialize({param!r}) gave {value.dtype} {tuple(value.shape)} "
                    f"(contiguous={value.is_contiguous()}); the checkpoint stores it as {expect}"
                )
            self._name, self._value = param, value
        # as_strided's offset is absolute in the storage; the value may itself be a view.
        chunk = self._value.as_strided(view.size, view.stride, self._value.storage_offset() + view.storage_offset)
        return chunk.reshape(write_item.tensor_data.chunk.sizes)


class _StreamingWriter(FileSystemWriter):
    """One `__<rank>_0.distcp` per rank, written item by item in the calling thread."""

    def __init__(self, path):
        super().__init__(path, single_file_per_rank=True, thread_count=1, sync_files=True)
        self.checksums: dict[str, dict[str, Any]] = {}

    def write_data(self, plan, planner) -> Future:
        file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = os.path.join(self.path, file_name)
        results = []
        stream = None
        try:
            with open(path, "wb") as f:
                # The checksum is taken on the way to the file: no second read pass.
                stream = checksums.HashingWriter(f)
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        tensor = _own_storage(data.detach().cpu())
                        # NOTE: torch.load never checks the zip CRC32 that torch.save computes by
                        # default; skipping it cut the time of torch.save by about 30% here.
                        with torch_serialization.config.patch({"save.compute_crc32": False}):
                            torch.save(tensor, stream)
                        del tensor
                    del data
                    length = stream.tell() - offset
                    results.append(
                        WriteResult(
                            index=item.index, size_in_bytes=length, storage_data=_StorageInfo(file_name, offset, length)
                        )
                    )
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            # torch.save reports a failed write as "unexpected pos A vs B"; the stream kept the cause.
            cause = stream.error if stream is not None and stream.error is not None else e
            if not isinstance(cause, OSError):
                raise
            raise CheckpointError(f"{path}: cannot write: {cause.strerror or cause}") from None
        self.checksums = {file_name: stream.entry()}
        fut: Future = Future()
        fut.set_result(results)
        return fut


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` on a storage of exactly its own bytes: torch.save writes a tensor's whole storage.

    A contiguous view (a parameter inside DDP's buffer, half of SwiGLU's fc1) gets a storage
    that aliases its bytes; a copy (`clone`) would cost fresh memory, and first-touch page
    faults are the slowest part of a copy (docs/benchmarks.md, "Fresh memory is the expensive part").
    """
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    if not t.is_contiguous():
        return t.contiguous()
    start = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()[start : start + t.nbytes], 0, t.shape, t.stride())
