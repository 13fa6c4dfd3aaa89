"""Write HF checkpoints: size-capped safetensors shards plus `model.safetensors.index.json`, streamed.

A safetensors file starts with a JSON header holding every tensor's byte range, so a shard is
normally assembled in memory before it is written (`safetensors.torch.save_file`), and a 5 GB
shard costs 5 GB of RAM. Here the plan (names, shapes, dtypes) is known before any data is read:
the exporter derives it from config.json. So each shard's header is written first, and tensors
are appended one at a time in plan order. Memory stays at one tensor, whatever the shard size.

Like `save_pretrained`, a plan that fits in one shard becomes `model.safetensors` with no index.
Shards are written as `<name>.partial` and renamed when complete, and the index comes last: a
directory with an index and no `.partial` files is a complete checkpoint. The writer refuses a
folder that already holds weight files (their index could name stale shards); the converter
writes into a fresh staging folder and renames it (`bridge.output_dir`).

Non-weight files of the source model (tokenizer, generation_config, chat template) travel with
`checkpoint.hf_assets.copy_hf_assets`; config.json is written by `write_hf_config`, with the export dtype.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from agpo_megatron.bridge.output_dir import fault_point

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # what transformers' save_pretrained uses ("5GB")

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class HFWriteError(ValueError):
    """A tensor that does not match the export plan; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the export plan."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclasses.dataclass
class _Shard:
    file: str
    specs: list[TensorSpec]

    def header(self) -> bytes:
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in self.specs:
            entries[s.name] = {
                "dtype": _ST_DTYPES[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes with spaces
        return struct.pack("<Q", len(raw)) + raw


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[_Shard]:
    """Greedy, in plan order: a new shard starts when the next tensor would pass the cap.

    A tensor larger than the cap gets a shard of its own (as in transformers).
    """
    groups: list[list[TensorSpec]] = []
    size = 0
    for s in specs:
        if not groups or (size + s.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    if len(groups) == 1:
        return [_Shard(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class HFCheckpointWriter:
    """Streams tensors, in plan order, into safetensors shards under `out_dir`.

    `write(name, tensor)` must follow `specs` order exactly; shape and dtype must match the spec
    (cast before writing). `close()` checks that every planned tensor was written, then writes
    the index. Used as a context manager, it closes on success only.
    """

    def __init__(self, out_dir: str | Path, specs: list[TensorSpec], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise HFWriteError(f"export plan names tensors more than once: {dup}")
        unsupported = sorted({str(s.dtype) for s in specs if s.dtype not in _ST_DTYPES})
        if unsupported:
            raise HFWriteError(f"safetensors cannot store dtypes {unsupported}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.dir.iterdir() if p.name.endswith((".safetensors", ".partial", INDEX_NAME)))
        if stale:
            raise HFWriteError(f"{self.dir}: already holds weight files {stale[:3]}; write into a new folder")
        self.shards = plan_shards(specs, max_shard_bytes)
        self._queue = [(shard, spec) for shard in self.shards for spec in shard.specs]
        self._next = 0
        self._stream = None
        self.bytes_written = 0

    def __enter__(self) -> HFCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._stream is not None:
            self._stream.close()  # leave the .partial file: it marks the failed export

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise HFWriteError(f"tensor {name!r} is not in the export plan (all {len(self._queue)} already written)")
        shard, spec = self._queue[self._next]
        if name != spec.name:
            raise HFWriteError(f"tensor {name!r} written out of order: the plan expects {spec.name!r} next")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise HFWriteError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, the plan says {spec.dtype} {spec.shape}"
            )
        # Issue 11: never export NaN/Inf. max |x| is NaN or Inf iff an element is; a reduction, where
        # isfinite(t).all() allocated temporaries of ~2.5x the tensor (megatron_to_hf's peak RSS rose
        # from 1.5 to 4.3 GB at Qwen2.5-7B shapes: docs/benchmarks.md).
        if tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
            raise HFWriteError(f"tensor {name!r} has non-finite values (NaN or Inf); nothing was exported")
        if spec is shard.specs[0]:
            self._stream = open(self.dir / (shard.file + ".partial"), "wb")
            self._stream.write(shard.header())
        # The bytes of the contiguous tensor, through a uint8 view: no copy for contiguous input.
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._stream.write(memoryview(data))
        self.bytes_written += spec.nbytes
        self._next += 1
        if spec is shard.specs[-1]:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            self._stream = None
            os.replace(self.dir / (shard.file + ".partial"), self.dir / shard.file)
            fault_point("hf_writer:shard")

    def close(self) -> list[Path]:
        """Check completeness, write the index (if sharded); returns the shard paths."""
        if self._next != len(self._queue):
            missing = [s.name for _, s in self._queue[self._next :]]
            raise HFWriteError(
                f"{self.dir}: export incomplete, {len(missing)} tensor(s) never written, first {missing[:5]}"
            )
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
                "weight_map": {s.name: shard.file for shard in self.shards for s in shard.specs},
            }
            _write_json_atomic(self.dir / INDEX_NAME, index)
        return [self.dir / s.file for s in self.shards]


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(torch.linalg.vector_norm(tensor.detach(), float("inf"))))


def write_hf_config(out_dir: str | Path, config: dict[str, Any], dtype: torch.dtype) -> None:
    """config.json with the export dtype, under whichever dtype key(s) the source used."""
    cfg = dict(config)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = name
    _write_json_atomic(Path(out_dir) / "config.json", cfg)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
