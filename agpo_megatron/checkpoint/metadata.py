"""Megatron distributed checkpoints (torch_dist): the trainer's save/resume, and the format the
HF converters read and write.

A checkpoint directory::

    metadata.json        dist_checkpointing backend and version (torch_dist, 1)
    common.pt            non-tensor state, saved by rank 0: step, extra_state, scheduler, optimizer param groups
                         (megatron-core 0.16; 0.19 stores it as the object `common_state` in the .distcp files,
                         so 0.19 reads 0.16's checkpoints but not the reverse)
    .metadata            torch.distributed.checkpoint index: each tensor's global shape, dtype and chunks
    __<rank>_0.distcp    one file per saving rank, holding that rank's chunks
    agpo_meta.json       our sidecar (`CheckpointMeta`): step, HF config.json, source, dtype, layout,
                         and a checksum of every other file (verified before a load reads a tensor)
    hf_assets/           tokenizer and generation_config files of the HF model, for export back to HF

Tensors are keyed the way `model.sharded_state_dict()` keys them: by global name and global shape.
Layers are stacked on a leading axis, and a TP shard is an offset into the full tensor. So a
checkpoint written at one TP/PP loads at any other: torch DCP reads the overlapping parts of the
stored chunks.

The sidecar is written after the tensors, so its presence marks a complete checkpoint. Save to
a fresh directory per step: overwriting a checkpoint in place leaves nothing complete if the job
dies halfway.

What a checkpoint says about itself: our sidecar (`agpo_meta.json`), and the checks of the
files against it and against torch DCP's `.metadata` index.

The sidecar is written last (`storage.finish`), so its presence marks a complete checkpoint. It
holds a checksum of every other file; `verify_checkpoint` and `verify_collective` check them
before a load reads a tensor, and `check_sizes` names a truncated data file cheaply even when
the checksums are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import CheckpointException, FileSystemReader

from agpo_megatron.checkpoint import CheckpointError, checksums
from agpo_megatron.runtime import cpu_platform

SIDECAR = "agpo_meta.json"
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True)
class CheckpointMeta:
    """Contents of `agpo_meta.json`: what export to HF and resuming need that the tensors lack."""

    step: int = 0
    """Trainer step at save time; 0 for a checkpoint converted from HF."""
    source: str
    """Where the weights came from: 'hf:<abs dir>' (converted) or 'trainer'."""
    params_dtype: str
    """dtype of the stored model tensors ('bfloat16', 'float32', ...)."""
    tp: int
    """Tensor-parallel size of the saving run (any TP loads it)."""
    pp: int
    """Pipeline-parallel size of the saving run (any PP loads it)."""
    hf_config: dict[str, Any] | None
    """The HF config.json contents. None when unknown; export then needs --hf-config-from."""
    format_version: int = FORMAT_VERSION
    """Bumped when this sidecar's meaning changes."""
    checksums: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Every other file of the checkpoint: relative path -> {"bytes": size, "<algo>": hex digest}
    (`agpo_megatron.checkpoint.checksums`). Empty for checkpoints saved before checksums existed."""


def write_meta(path: str | Path, meta: CheckpointMeta) -> None:
    """Write the sidecar atomically (rank 0 only; the caller decides)."""
    target = Path(path) / SIDECAR
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
    os.replace(tmp, target)


def read_meta(path: str | Path) -> CheckpointMeta | None:
    """The sidecar, or None for a checkpoint written by another tool (e.g. Megatron-LM)."""
    file = Path(path) / SIDECAR
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{file}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        return CheckpointMeta(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{file}: not a valid {SIDECAR} ({e})") from None


def require_checkpoint(path: str | Path) -> Path:
    """`path` as a Path, or a clear error if it is not a dist checkpoint directory."""
    path = Path(path)
    if not (path / "metadata.json").is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: not a Megatron torch_dist checkpoint (needs metadata.json and .metadata); "
            "an interrupted save leaves neither"
        )
    return path


_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def is_optimizer_key(key: str) -> bool:
    """A stored tensor of optimizer state, not a weight. An MoE model's Megatron optimizer is a
    chain (dense params, expert params: their DP groups differ), stored as `chained_<i>.optimizer.*`."""
    return _OPTIMIZER_KEY.match(key) is not None


def stored_tensors(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint key -> (global shape, dtype) of every tensor stored (model and optimizer)."""
    path = require_checkpoint(path)
    try:
        with cpu_platform.megatron_scope():
            meta = dist_checkpointing.load_tensors_metadata(str(path))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    return {k: (tuple(sh.global_shape), sh.dtype) for k, sh in meta.items()}


# ---- integrity: checksums from the sidecar, data file sizes from .metadata -----------------------


def verify_checkpoint(path: str | Path, skip_hint: str = checksums.SKIP_CONVERTER) -> None:
    """Check every file of the checkpoint against the checksums in its sidecar, in this process.

    A mismatch raises a one-line CheckpointError naming the file. A checkpoint saved without
    checksums (or by another tool) passes, with a one-line note on stderr.
    """
    problems, note = _verify_share(Path(path), 0, 1, skip_hint)
    if note:
        print(note, file=sys.stderr, flush=True)
    if problems:
        raise CheckpointError(problems[0])


def verify_collective(path: Path, skip_hint: str = checksums.SKIP_CONVERTER) -> None:
    """`verify_checkpoint` over the world: each rank hashes every world-th file; all ranks raise alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problems, note = _verify_share(path, rank, world, skip_hint)
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, problems)
    bad = sorted(p for g in gathered for p in g)
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    if bad:
        raise CheckpointError(bad[0] + (f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""))


def _verify_share(path: Path, rank: int, world: int, skip_hint: str) -> tuple[list[str], str | None]:
    meta = read_meta(path)
    if meta is None or not meta.checksums:
        why = f"it has no {SIDECAR}" if meta is None else "it was saved before checksums existed"
        return [], f"note: {path}: loading without checksum verification ({why})"
    files = sorted(meta.checksums)[rank::world]
    return [p for rel in files if (p := checksums.check(path, rel, meta.checksums[rel], SIDECAR, skip_hint))], None


def add_checksums(path: Path, files: list[str]) -> None:
    """Hash `files` (relative to the checkpoint `path`, written after the sidecar: a run checkpoint's
    RNG states and run state) into its sidecar, which is rewritten atomically. Rank 0 only."""
    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(f"{path}: no {SIDECAR} to add checksums to")
    sums = dict(meta.checksums)
    for rel in files:
        try:
            sums[rel] = checksums.file_entry(path / rel)
        except OSError as e:
            raise CheckpointError(f"{path / rel}: cannot read it back to checksum it: {e.strerror or e}") from None
    write_meta(path, dataclasses.replace(meta, checksums=dict(sorted(sums.items()))))


def check_sizes(path: Path, reader: FileSystemReader | None = None) -> None:
    """Every data file at least as long as `.metadata` says: a truncated file named, cheaply.

    NOTE: not inside a reader's `read_metadata`: torch DCP swallows errors raised there.
    """
    try:
        metadata = (reader or FileSystemReader(str(path))).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; the checkpoint's .metadata places tensors in it")
        if f.stat().st_size < n:
            raise CheckpointError(f"{f}: truncated: {f.stat().st_size} bytes, the checkpoint's .metadata needs {n}")
    common = path / "common.pt"
    if common.is_file() and not zipfile.is_zipfile(common):
        raise CheckpointError(f"{common}: truncated or corrupt (not a torch.save archive)")
