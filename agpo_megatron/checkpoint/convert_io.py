"""The HF converters' side of the checkpoint: models on the meta device, a save that produces
each parameter only when the writer reaches it, and a reader that returns one parameter at a
time. Both go through the same files and writer as the trainer (`storage`), so a converted
checkpoint is one the trainer could have saved.

The converters read the sidecar and the stored-tensor index through `metadata`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state as mpu
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import CheckpointException

from agpo_megatron.checkpoint.direct_reader import DirectReader
from agpo_megatron.checkpoint.metadata import CheckpointMeta, check_sizes, require_checkpoint, verify_checkpoint
from agpo_megatron.checkpoint.storage import (
    StreamingSaveStrategy,
    checkpoint_error,
    finish,
    leaves,
    mkdir,
    save_state,
    sharded_sd_metadata,
    view_of,
)
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.runtime import cpu_platform


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
    par = ParallelConfig(
        tp=mpu.get_tensor_model_parallel_world_size(),
        pp=mpu.get_pipeline_model_parallel_world_size(),
        ep=mpu.get_expert_model_parallel_world_size(),
        etp=mpu.get_expert_tensor_parallel_world_size(),
    )
    # NOTE: RoPE scaling only changes the non-persistent `inv_freq` buffer, which no checkpoint
    # holds. build_gpt overwrites that buffer with a table computed for the CPU, which
    # cannot be copied from the meta device, so the scaling is left out of the abstract model.
    arch = dataclasses.replace(arch, rope_scaling=None)
    with torch.device("meta"):
        return build.build_gpt(arch, model_cfg, par)


def save_from_source(
    path: str | Path,
    model: torch.nn.Module,
    materialize: Callable[[str], torch.Tensor],
    meta: CheckpointMeta,
    *,
    hf_assets_from: str | Path | None = None,
) -> None:
    """Save `model`'s checkpoint with each parameter produced at write time by `materialize`.

    Collective. `model` is usually `abstract_model(...)`. `materialize(name)` returns this
    rank's local value of parameter `name` (a `model.state_dict()` name) with the parameter's
    shape and dtype. It is called once per parameter, in write order, and only its result is
    held: memory stays at about one parameter. It is called only on the rank that stores a
    parameter: replicas, such as a norm on tp_rank > 0, are not written.
    """
    path = Path(path)
    if dist.get_rank() == 0:
        mkdir(path)
    dist.barrier()
    state = {
        "model": model.sharded_state_dict(metadata=sharded_sd_metadata()),
        "agpo": {"step": meta.step, "extra_state": {}},
    }
    sums = save_state(state, path, StreamingSaveStrategy(materialize))
    if dist.get_rank() == 0:
        finish(path, meta, sums, hf_assets_from=hf_assets_from)
    dist.barrier()


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
        self._chunks = {
            name: [sh for sh in leaves(node) if isinstance(sh, ShardedTensor)] for name, node in self._params.items()
        }
        self._meta = dict(model.named_parameters())
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._reader = DirectReader(self.path)
        check_sizes(self.path, self._reader)

    def names(self) -> list[str]:
        return list(self._chunks)

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint key -> (global shape, dtype) that the model expects."""
        return {sh.key: (tuple(sh.global_shape), sh.dtype) for chunks in self._chunks.values() for sh in chunks}

    def get(self, name: str) -> torch.Tensor:
        """Parameter `name` as `model` would hold it after loading, in the stored dtype.

        The result lives in a buffer that the next `get` reuses: consume it (or copy it) first.
        NOTE: reusing one buffer, sized by the largest parameter, bounds memory. It is also
        faster: touching fresh memory costs more than the copy itself (measured in
        docs/benchmarks.md, "Fresh memory is the expensive part").
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
            v = view_of(sh.data)
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            # Read each piece straight into its place in `out` (SwiGLU: gate, then up).
            request[str(i)] = ShardedTensor(
                key=sh.key,
                data=out.as_strided(v.size, v.stride, v.storage_offset).view(shape),
                dtype=sh.dtype,
                local_shape=shape,
                global_shape=tuple(sh.global_shape),
                global_offset=tuple(sh.global_offset),
                axis_fragmentations=None,
            )
        # Straight to torch DCP, without Megatron's `load` around it: that re-reads common.pt
        # and checks that the requests cover every tensor, which one parameter never does.
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(request)
        try:
            dcp.load(
                mcore_to_pyt_state_dict(by_key, is_loading=True),
                storage_reader=self._reader,
                planner=MCoreLoadPlanner(),
                no_dist=True,
            )
        except (Exception, CheckpointException) as e:
            raise checkpoint_error(e, self.path, "read") from None
        return out
