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

NOTE (why not megatron's default writer): `TorchDistSaveShardedStrategy` forks writer processes
and starts a spawn-context Manager even for a synchronous save, and the spawn re-imports
`__main__`. It also resolves every tensor (cloning views, which is every parameter inside DDP's
contiguous buffer) before writing the first byte: a second copy of the rank's state in host
memory. torch's own `FileSystemWriter` keeps every tensor of a file alive until the file is
closed. `_StreamingWriter` writes one file per rank, in the calling thread, one tensor at a time,
and drops each tensor once it is written. That bounded memory is what lets the HF converter
produce tensors lazily (`save_from_source`), and the trainer shares the same path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.serialization as torch_serialization
from megatron.core import __version__ as _mcore_version
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
from megatron.core.transformer.module import Float16Module
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter, LoadPlan
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from agpo_megatron import checksums
from agpo_megatron.bridge.hf_io import CheckpointError
from agpo_megatron.bridge.hf_writer import copy_hf_assets
from agpo_megatron.config import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.nonfinite import check_finite_weights
from agpo_megatron.platform import cpu as cpu_platform

SIDECAR = "agpo_meta.json"
_MCORE_VERSION = tuple(int(x) for x in _mcore_version.split(".")[:2])
ASSETS_DIR = "hf_assets"
FORMAT_VERSION = 1


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
    return {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


# ---- sidecar ---------------------------------------------------------------------------------


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
    (`agpo_megatron.checksums`). Empty for checkpoints saved before checksums existed."""


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


# ---- trainer API -----------------------------------------------------------------------------


class Restored(NamedTuple):
    """What `load_checkpoint` hands back to the trainer."""

    extra_state: dict[str, Any]
    step: int


def save_checkpoint(path: str | Path, model_chunks, optimizer=None, scheduler=None,
                    extra_state: dict | None = None, step: int = 0, *,
                    hf_dir: str | Path | None = None) -> None:
    """Save model (+ optimizer, scheduler, extra_state, step) to `path`. Collective: every rank calls it.

    `model_chunks`: this rank's model, a module or a one-element list; DDP / Float16Module
    wrappers are unwrapped. `extra_state` must be the same on every rank (rank 0's copy is
    saved) and made of what `torch.load(weights_only=True)` accepts: dicts, lists, str, numbers,
    tensors. `hf_dir`: the HF model the run started from. Its config.json and tokenizer go into
    the checkpoint, so that `megatron_to_hf` needs nothing else.
    """
    path = Path(path)
    chunks = _as_chunks(model_chunks)
    # Non-finite weights are never written (issue 11); collective, so every rank refuses alike.
    check_finite_weights(((n, p) for c in chunks for n, p in c.named_parameters()), f"saving {path}")
    if dist.get_rank() == 0:
        _mkdir(path)
    dist.barrier()
    sd_meta = sharded_sd_metadata()
    state = _model_state(chunks, sd_meta)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=sd_meta)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["agpo"] = {"step": int(step), "extra_state": dict(extra_state or {})}
    sums = _save(state, path, _StreamingSaveStrategy())
    if dist.get_rank() == 0:
        hf_config = None if hf_dir is None else json.loads((Path(hf_dir) / "config.json").read_text())
        _finish(path, CheckpointMeta(
            step=int(step), source="trainer", params_dtype=_dtype_name(next(chunks[0].parameters()).dtype),
            tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size(),
            hf_config=hf_config,
        ), sums, hf_assets_from=hf_dir)
    dist.barrier()


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the checkpoint folder: {e.strerror or e}") from None


def _save(state: dict, path: Path, strategy: _StreamingSaveStrategy) -> dict[str, dict[str, Any]]:
    """`dist_checkpointing.save`, any failure one CheckpointError naming the file. Collective.

    Returns the checksums of every rank's data file, taken while writing it.
    """
    try:
        with cpu_platform.megatron_scope():
            dist_checkpointing.save(state, str(path), sharded_strategy=strategy)
    except (Exception, CheckpointException) as e:  # NOTE: torch's CheckpointException is a BaseException
        raise _checkpoint_error(e, path, "write") from None
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, getattr(strategy, "checksums", {}))
    return {k: v for g in gathered for k, v in g.items()}


def _finish(path: Path, meta: CheckpointMeta, sums: dict[str, dict[str, Any]], *,
            hf_assets_from: str | Path | None) -> None:
    """Rank 0, after the tensors: the HF assets, then the sidecar with a checksum of every file.

    The small files (common.pt, .metadata, metadata.json, assets) are hashed here, after writing.
    """
    try:
        if hf_assets_from is not None:
            copy_hf_assets(hf_assets_from, path / ASSETS_DIR)
        write_meta(path, dataclasses.replace(meta, checksums=checksums.complete(path, sums, skip={SIDECAR})))
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot write: {e.strerror or e}") from None


def _checkpoint_error(e: BaseException, path: Path, doing: str) -> CheckpointError:
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


@torch.no_grad()  # the optimizer copies into fp32 main params, which for fp32 models are the params
def load_checkpoint(path: str | Path, model_chunks, optimizer=None, scheduler=None, *,
                    verify: bool = True) -> Restored:
    """Load `path` into this rank's model (+ optimizer, scheduler), at whatever TP/PP it runs.

    Collective. With `optimizer=None`, only the weights are loaded: use this for checkpoints
    converted from HF, which hold no optimizer state, and for resuming at another TP/PP. Build
    the optimizer after loading, since Megatron's optimizer copies the weights into its fp32
    main params when it is constructed. Returns the saved `extra_state` and `step` ({} and 0 for
    a converted checkpoint). `verify`: check every file against the checksums in the sidecar
    first (each rank hashes a share of the files); a mismatch is a CheckpointError naming the file.
    """
    path = require_checkpoint(path)
    if verify:
        _verify_collective(path)
    _check_sizes(path)
    if not (path / "common.pt").is_file() and _MCORE_VERSION < (0, 17):
        raise CheckpointError(f"{path}: no common.pt, so written by a newer megatron-core (0.19 keeps it "
                              f"in the .distcp files); megatron-core {_mcore_version} cannot read it")
    chunks = _as_chunks(model_chunks)
    sd_meta = sharded_sd_metadata()
    state = _model_state(chunks, sd_meta)
    if optimizer is not None:
        _allocate_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=sd_meta)
    with cpu_platform.megatron_scope():
        # NOTE: Megatron calls a key the model requests but the checkpoint lacks "unexpected"
        # (and drops it from the load), and a key stored but not requested "missing".
        try:
            loaded, stored_only, absent = dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_ALL)
        except (Exception, CheckpointException) as e:
            raise _checkpoint_error(e, path, "read") from None
    absent = {k for k in absent if not _is_extra_state(k)}
    if absent:
        hint = ""
        if any(k.startswith("optimizer.") for k in absent):
            hint = " It holds no (compatible) optimizer state: load it with optimizer=None."
        raise CheckpointError(
            f"{path}: {len(absent)} tensor(s) the model needs are not in the checkpoint, e.g. "
            f"{sorted(absent)[:6]}.{hint}"
        )
    # Stored weights the model has no place for (optimizer state may be left out on purpose;
    # objects such as another tool's RNG state are not weights).
    weights = stored_tensors(path)
    extra = {k for k in stored_only if k in weights and not k.startswith("optimizer.") and not _is_extra_state(k)}
    if extra:
        raise CheckpointError(
            f"{path}: {len(extra)} stored tensor(s) have no place in the model, e.g. {sorted(extra)[:6]}; "
            "was it saved from another architecture (e.g. tied vs untied embeddings)?"
        )
    for key, chunk in zip(_model_keys(chunks), chunks):
        result = _unwrap(chunk).load_state_dict(loaded[key], strict=False)
        wrong = [k for k in (*result.missing_keys, *result.unexpected_keys) if not _is_extra_state(k)]
        if wrong:
            raise CheckpointError(f"{path}: the loaded state does not match the model: {sorted(wrong)[:6]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_step(optimizer)
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise CheckpointError(f"{path}: no scheduler state in this checkpoint; load it with scheduler=None")
        scheduler.load_state_dict(loaded["scheduler"])
    agpo = loaded.get("agpo", {"step": 0, "extra_state": {}})
    return Restored(extra_state=agpo["extra_state"], step=int(agpo["step"]))


def _is_extra_state(key: str) -> bool:
    """A module's `_extra_state` entry (Megatron's checkpoint key or a torch state-dict key).

    NOTE: the Transformer Engine spec stores extra state (FP8 scaling metadata) where the local
    spec has none, e.g. `decoder.final_layernorm._extra_state` and the q/k norms'. TE rebuilds
    it when absent, and the local spec ignores it, so a checkpoint loads under either spec
    as long as the real weights match.
    """
    return key.endswith("_extra_state")


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state before loading into it.

    NOTE: without Apex/TE (so always on CPU), `DistributedOptimizer.state_dict()` reads Adam's
    `step` from the per-parameter state, which torch allocates at the first step; a fresh
    optimizer fails an assert there. Megatron's own remedy (used for its FSDP format) is one
    step on zero gradients. Everything it touches (moments, step, fp32 main params) is then
    overwritten by the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, DistributedOptimizer) and inner is not None and len(inner.state) == 0:
            with cpu_platform.megatron_scope():
                opt._init_optimizer_states_with_dummy_values()


def _restore_torch_adam_step(optimizer) -> None:
    """Put the saved Adam step back into torch Adam's per-parameter state.

    NOTE: without Apex/TE, Megatron saves the step in the param groups (restored by
    `load_state_dict`), but the 'dp_reshardable' parameter state then copies every state
    tensor of the *local* optimizer over it, 'step' included. That local step is the one left
    by `_allocate_optimizer_state`. Adam's bias correction would then restart, and a resumed
    run would drift from the original.
    """
    if HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"] if "step" in group else ():
                if "step" in opt.optimizer.state.get(p, {}):
                    opt.optimizer.state[p]["step"] = torch.tensor(float(group["step"]))


def _as_chunks(model_chunks) -> list[torch.nn.Module]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        # models/build.py builds one chunk per rank; virtual-pipeline chunks would each need
        # their own layer offset at `sharded_state_dict` time, which nothing here can test.
        raise NotImplementedError(f"expected one model chunk per rank, got {len(chunks)} (virtual pipeline)")
    return chunks


def _model_keys(chunks: list[torch.nn.Module]) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_state(chunks: list[torch.nn.Module], sd_meta: dict[str, Any]) -> dict[str, Any]:
    return {key: _unwrap(c).sharded_state_dict(metadata=sd_meta)
            for key, c in zip(_model_keys(chunks), chunks)}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module (DDP has no `sharded_state_dict` of its own)."""
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- converter API: abstract models, lazy save, one-parameter-at-a-time load -----------------


def abstract_model(arch, params_dtype: str):
    """This rank's GPTModel stage on the `meta` device: the layout of `sharded_state_dict()`
    (names, shapes, TP/PP offsets) with no memory behind it.

    Uses the trainer's own `build_gpt`, so converted checkpoints match what the trainer saves.
    CPU only: on a GPU machine Megatron allocates parameters on CUDA explicitly, past the meta
    device context (the converter CLIs hide GPUs for that reason).
    """
    if cpu_platform.cuda_present():
        raise RuntimeError("abstract_model runs on CPU only: set CUDA_VISIBLE_DEVICES='' for conversion")
    model_cfg = ModelConfig(params_dtype=params_dtype, spec="local", max_seq_len=1)
    par = ParallelConfig(tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size())
    # NOTE: RoPE scaling only changes the non-persistent `inv_freq` buffer, which no checkpoint
    # holds. build_gpt overwrites that buffer with a table computed for the CPU, which
    # cannot be copied from the meta device, so the scaling is left out of the abstract model.
    arch = dataclasses.replace(arch, rope_scaling=None)
    with torch.device("meta"):
        return build.build_gpt(arch, model_cfg, par)


def save_from_source(path: str | Path, model: torch.nn.Module, materialize: Callable[[str], torch.Tensor],
                     meta: CheckpointMeta, *, hf_assets_from: str | Path | None = None) -> None:
    """Save `model`'s checkpoint with each parameter produced at write time by `materialize`.

    Collective. `model` is usually `abstract_model(...)`. `materialize(name)` returns this
    rank's local value of parameter `name` (a `model.state_dict()` name) with the parameter's
    shape and dtype. It is called once per parameter, in write order, and only its result is
    held: memory stays at about one parameter. It is called only on the rank that stores a
    parameter: replicas, such as a norm on tp_rank > 0, are not written.
    """
    path = Path(path)
    if dist.get_rank() == 0:
        _mkdir(path)
    dist.barrier()
    state = {"model": model.sharded_state_dict(metadata=sharded_sd_metadata()),
             "agpo": {"step": meta.step, "extra_state": {}}}
    sums = _save(state, path, _StreamingSaveStrategy(materialize))
    if dist.get_rank() == 0:
        _finish(path, meta, sums, hf_assets_from=hf_assets_from)
    dist.barrier()


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


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of the checkpoint against the checksums in its sidecar, in this process.

    A mismatch raises a one-line CheckpointError naming the file. A checkpoint saved without
    checksums (or by another tool) passes, with a one-line note on stderr.
    """
    problems, note = _verify_share(Path(path), 0, 1)
    if note:
        print(note, file=sys.stderr, flush=True)
    if problems:
        raise CheckpointError(problems[0])


def _verify_collective(path: Path) -> None:
    """`verify_checkpoint` over the world: each rank hashes every world-th file; all ranks raise alike."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problems, note = _verify_share(path, rank, world)
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, problems)
    bad = sorted(p for g in gathered for p in g)
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    if bad:
        raise CheckpointError(bad[0] + (f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""))


def _verify_share(path: Path, rank: int, world: int) -> tuple[list[str], str | None]:
    meta = read_meta(path)
    if meta is None or not meta.checksums:
        why = f"it has no {SIDECAR}" if meta is None else "it was saved before checksums existed"
        return [], f"note: {path}: loading without checksum verification ({why})"
    files = sorted(meta.checksums)[rank::world]
    return [p for rel in files if (p := checksums.check(path, rel, meta.checksums[rel], SIDECAR))], None


def _check_sizes(path: Path, reader: FileSystemReader | None = None) -> None:
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
            raise CheckpointError(f"{f}: truncated: {f.stat().st_size} bytes, the checkpoint's .metadata "
                                  f"needs {n}")
    common = path / "common.pt"
    if common.is_file() and not zipfile.is_zipfile(common):
        raise CheckpointError(f"{common}: truncated or corrupt (not a torch.save archive)")


class ParamReader:
    """A checkpoint's model parameters, one at a time, laid out like `model`.

    `model` is typically `abstract_model(arch, dtype)` in a world of one process: then every
    parameter comes back as the full tensor, whatever layout the checkpoint was saved at.
    """

    def __init__(self, path: str | Path, model: torch.nn.Module, *, verify: bool = True):
        self.path = require_checkpoint(path)
        if verify:  # `verify`: as in load_checkpoint, but this process checks every file
            verify_checkpoint(self.path)
        sd = model.sharded_state_dict(metadata=sharded_sd_metadata())
        self._params = {name: sd[name] for name, _ in model.named_parameters() if name in sd}
        apply_factories(self._params)  # SwiGLU fc1 -> its stored pieces, as views of the meta param
        self._chunks = {name: [sh for sh in _leaves(node) if isinstance(sh, ShardedTensor)]
                        for name, node in self._params.items()}
        self._meta = dict(model.named_parameters())
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._reader = _DirectReader(self.path)
        _check_sizes(self.path, self._reader)

    def names(self) -> list[str]:
        return list(self._chunks)

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint key -> (global shape, dtype) that the model expects."""
        return {sh.key: (tuple(sh.global_shape), sh.dtype) for chunks in self._chunks.values() for sh in chunks}

    def get(self, name: str) -> torch.Tensor:
        """Parameter `name` as `model` would hold it after loading, in the stored dtype.

        The result lives in a buffer that the next `get` reuses: consume it (or copy it) first.
        NOTE: reusing one buffer, sized by the largest parameter, bounds memory. It is also
        faster: touching fresh memory costs more than the copy itself on this VM (0.3 GB/s
        fresh vs 7 GB/s warm).
        """
        meta = self._meta[name]
        nbytes = meta.numel() * meta.dtype.itemsize
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        out = self._buffer[:nbytes].view(meta.dtype).view(meta.shape)
        # NOTE: each piece is requested with its layer axis as a real dim (prepend_axis_num=0).
        # Megatron's legacy path for prepended axes assumes the rest of a layer stack lives on
        # other ranks; in a world of one, asking for one layer of the stack then fails.
        request = {}
        for i, sh in enumerate(self._chunks[name]):
            v = _view_of(sh.data)
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            # Read each piece straight into its place in `out` (SwiGLU: gate, then up).
            request[str(i)] = ShardedTensor(
                key=sh.key, data=out.as_strided(v.size, v.stride, v.storage_offset).view(shape), dtype=sh.dtype,
                local_shape=shape, global_shape=tuple(sh.global_shape), global_offset=tuple(sh.global_offset),
                axis_fragmentations=None,
            )
        # Straight to torch DCP, without Megatron's `load` around it: that re-reads common.pt
        # and checks that the requests cover every tensor, which one parameter never does.
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(request)
        try:
            dcp.load(mcore_to_pyt_state_dict(by_key, is_loading=True), storage_reader=self._reader,
                     planner=MCoreLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as e:
            raise _checkpoint_error(e, self.path, "read") from None
        return out


def _leaves(tree) -> Iterator[Any]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


# ---- the streaming save strategy ---------------------------------------------------------------


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist format, written synchronously by `_StreamingWriter` (see the module NOTE).

    With `materialize`, tensor data comes from it instead of the state dict (`save_from_source`).
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


def _view_of(data: torch.Tensor) -> _View:
    return _View(tuple(data.shape), tuple(data.stride()), data.storage_offset())


def _param_views(sharded_state_dict) -> dict[tuple[str, tuple[int, ...]], tuple[str, _View]]:
    """(checkpoint key, global offset) -> the parameter, and the view of it, that a chunk is.

    After factories (SwiGLU splits fc1 into gate and up), a chunk's `data` is a view of the meta
    parameter; its geometry says which part of the materialized parameter to write.
    """
    views = {}
    for name, node in sharded_state_dict["model"].items():
        for sh in _leaves(node):
            if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
                views[(sh.key, tuple(sh.global_offset))] = (name, _view_of(sh.data))
    return views


class _MaterializingPlanner(MCoreSavePlanner):
    """Resolves tensor write items from `materialize(param)` instead of the (meta) state dict."""

    def __init__(self, views: dict[tuple[str, tuple[int, ...]], tuple[str, _View]],
                 materialize: Callable[[str], torch.Tensor], **kw):
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
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(file_name, offset, length)))
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
    faults are the slowest part of a copy on this VM (0.3 GB/s fresh vs 7 GB/s warm).
    """
    if t.untyped_storage().nbytes() == t.nbytes:
        return t
    if not t.is_contiguous():
        return t.contiguous()
    start = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()[start:start + t.nbytes], 0, t.shape, t.stride())


class _DirectReader(FileSystemReader):
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
                    raise CheckpointError(f"{self.path / info.relative_path}: chunk of {req.storage_index.fqn!r} "
                                          f"at byte {info.offset} is corrupt ({e})") from None
                if start is None:
                    stock.append(req)
                    continue
                f.seek(start)
                view = memoryview(target.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != target.nbytes:
                    raise CheckpointError(f"{self.path / info.relative_path}: chunk of {req.storage_index.fqn!r} "
                                          "is truncated")
            planner.commit_tensor(req, target)
        if stock:
            try:
                return super().read_data(LoadPlan(stock), planner)
            except Exception as e:
                info = self.storage_data[stock[0].storage_index]
                raise CheckpointError(f"{self.path / info.relative_path}: cannot read chunk(s) of "
                                      f"{stock[0].storage_index.fqn!r} ({type(e).__name__}: {e})") from None
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
