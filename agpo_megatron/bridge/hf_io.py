"""Read HF safetensors checkpoints lazily, and load them into a (TP/PP-sharded) Megatron model.

Tensors are read one at a time through `safe_open`, so loading never holds more than one full
tensor beyond the model itself. Every problem names the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from agpo_megatron.bridge import names
from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.models.hf_config import ModelArch


class HFCheckpointReader:
    """Lazy access to `model.safetensors` or a sharded `model.safetensors.index.json` checkpoint."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {missing}")
            self.weight_map = dict(weight_map)
        elif single.is_file():
            self.weight_map = {k: single.name for k in self._keys(single)}
        else:
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[str, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for truncation
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        return self._handles[file]

    def close(self) -> None:
        """Drop the open files.

        NOTE: safetensors maps each file and hands out tensors backed by the mapping, so every
        page read stays in this process's RSS while the file's handle is cached here (the
        tensors themselves keep their pages mapped only as long as they live). A streaming
        converter calls this after each parameter, so memory follows the live tensors.
        """
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        file = self.weight_map[name]
        try:
            return self._handle(file).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.dir / file}: cannot read tensor {name!r} ({e})") from None

    def dtype_of(self, name: str) -> torch.dtype:
        return self._handle(self.weight_map[name]).get_slice(name).get_dtype()


def spec_of(model: torch.nn.Module) -> str:
    """'te' if the model's layers are Transformer Engine (fused norm names), else 'local'."""
    return "te" if any(n.endswith("layer_norm_weight") for n, _ in model.named_parameters()) else "local"


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    arch: ModelArch,
    reader: HFCheckpointReader,
    *,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    ep_rank: int = 0,
    ep: int = 1,
    etp_rank: int = 0,
    etp: int = 1,
) -> None:
    """Fill this rank's shard of `model` from HF tensors; every local parameter must be covered.

    MoE: this rank reads only its own experts (EP rank `ep_rank` of `ep`), each split over ETP."""
    rules = {r.megatron: r for r in names.param_rules(arch, spec_of(model))}
    offset = names.layer_range(arch, pp_rank, pp).start
    first_expert = names.expert_offset(arch, ep_rank, ep)
    for local_name, param in model.named_parameters():
        gname = names.to_global_name(local_name, offset, first_expert)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            # Tied head on a PP>1 last stage: Megatron keeps a copy of the embedding there.
            rule = names.ParamRule("output_layer.weight", ("model.embed_tokens.weight",), "copy", 0)
        elif gname not in rules:
            raise CheckpointError(f"model parameter {local_name!r} (global {gname!r}) has no HF mapping")
        else:
            rule = rules[gname]
        full = names.hf_to_megatron(rule, [reader.get(n) for n in rule.hf], arch)
        expect = names.full_shape(rule, arch)
        if tuple(full.shape) != expect:
            raise CheckpointError(
                f"{reader.dir}: {rule.hf} give shape {tuple(full.shape)} for {gname}, but config.json implies {expect}"
            )
        local = (
            names.shard(rule, full, etp_rank, etp) if rule.expert is not None else names.shard(rule, full, tp_rank, tp)
        )
        if local.shape != param.shape:
            raise CheckpointError(f"{gname}: shard shape {tuple(local.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(local.to(param.dtype))
