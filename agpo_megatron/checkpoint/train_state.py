"""The trainer's checkpoint: `save_checkpoint` and `load_checkpoint` of model, optimizer,
scheduler, step and extra state, at any TP/PP for the weights (format: the package docstring).

`run_checkpoint.RunCheckpointer` decides when and where; this module only writes and reads one
checkpoint folder. Departures from a plain `dist_checkpointing.save/load`: the streaming writer
(`storage`), a checksum check before the load, and two fixups of Megatron's distributed optimizer
without Apex/TE (`_allocate_optimizer_state`, `_restore_torch_adam_step`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import __version__ as _mcore_version
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer
from megatron.core.transformer.module import Float16Module
from torch.distributed.checkpoint import CheckpointException

from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.checkpoint.metadata import (
    CheckpointMeta,
    check_sizes,
    is_optimizer_key,
    require_checkpoint,
    stored_tensors,
    verify_collective,
)
from agpo_megatron.checkpoint.storage import (
    StreamingSaveStrategy,
    checkpoint_error,
    finish,
    mkdir,
    save_state,
    sharded_sd_metadata,
)
from agpo_megatron.runtime import cpu_platform
from agpo_megatron.runtime.nonfinite import check_finite_weights

_MCORE_VERSION = tuple(int(x) for x in _mcore_version.split(".")[:2])


class Restored(NamedTuple):
    """What `load_checkpoint` hands back to the trainer."""

    extra_state: dict[str, Any]
    step: int


def save_checkpoint(
    path: str | Path,
    model_chunks,
    optimizer=None,
    scheduler=None,
    extra_state: dict | None = None,
    step: int = 0,
    *,
    hf_dir: str | Path | None = None,
) -> None:
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
        mkdir(path)
    dist.barrier()
    sd_meta = sharded_sd_metadata()
    state = _model_state(chunks, sd_meta)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=sd_meta)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["agpo"] = {"step": int(step), "extra_state": dict(extra_state or {})}
    sums = save_state(state, path, StreamingSaveStrategy())
    if dist.get_rank() == 0:
        hf_config = None if hf_dir is None else json.loads((Path(hf_dir) / "config.json").read_text())
        finish(
            path,
            CheckpointMeta(
                step=int(step),
                source="trainer",
                params_dtype=_dtype_name(next(chunks[0].parameters()).dtype),
                tp=mpu.get_tensor_model_parallel_world_size(),
                pp=mpu.get_pipeline_model_parallel_world_size(),
                hf_config=hf_config,
            ),
            sums,
            hf_assets_from=hf_dir,
        )
    dist.barrier()


@torch.no_grad()  # the optimizer copies into fp32 main params, which for fp32 models are the params
def load_checkpoint(
    path: str | Path,
    model_chunks,
    optimizer=None,
    scheduler=None,
    *,
    verify: bool = True,
    skip_hint: str = "checkpoint.verify=false",
) -> Restored:
    """Load `path` into this rank's model (+ optimizer, scheduler), at whatever TP/PP it runs.

    Collective. With `optimizer=None`, only the weights are loaded: use this for checkpoints
    converted from HF, which hold no optimizer state, and for resuming at another TP/PP. Build
    the optimizer after loading, since Megatron's optimizer copies the weights into its fp32
    main params when it is constructed. Returns the saved `extra_state` and `step` ({} and 0 for
    a converted checkpoint). `verify`: check every file against the checksums in the sidecar
    first (each rank hashes a share of the files); a mismatch is a CheckpointError naming the file
    and `skip_hint`, the way the caller's user skips the check.
    """
    path = require_checkpoint(path)
    if verify:
        verify_collective(path, skip_hint)
    check_sizes(path)
    if not (path / "common.pt").is_file() and _MCORE_VERSION < (0, 17):
        raise CheckpointError(
            f"{path}: no common.pt, so written by a newer megatron-core (0.19 keeps it "
            f"in the .distcp files); megatron-core {_mcore_version} cannot read it"
        )
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
            raise checkpoint_error(e, path, "read") from None
    absent = {k for k in absent if not _is_extra_state(k)}
    if absent:
        hint = ""
        if any(is_optimizer_key(k) for k in absent):
            hint = " It holds no (compatible) optimizer state: load it with optimizer=None."
        raise CheckpointError(
            f"{path}: {len(absent)} tensor(s) the model needs are not in the checkpoint, e.g. "
            f"{sorted(absent)[:6]}.{hint}"
        )
    # Stored weights the model has no place for (optimizer state may be left out on purpose;
    # objects such as another tool's RNG state are not weights).
    weights = stored_tensors(path)
    extra = {k for k in stored_only if k in weights and not is_optimizer_key(k) and not _is_extra_state(k)}
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
    return {key: _unwrap(c).sharded_state_dict(metadata=sd_meta) for key, c in zip(_model_keys(chunks), chunks)}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module (DDP has no `sharded_state_dict` of its own)."""
    while isinstance(module, (DistributedDataParallel, Float16Module)):
        module = module.module
    return module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
