"""HF safetensors -> Megatron torch_dist checkpoint, streamed one parameter at a time.

    hf_to_megatron --hf-dir Qwen2.5-Math-7B --out ckpt/qwen7b --tp 4 --pp 1

The checkpoint is written through the trainer's own path (`checkpoint.convert_io`), from a
model built on the meta device (no weights in memory). Each parameter is produced from the HF
tensors only when the writer reaches it: read, fused (QKV, gate/up) by `bridge.names`, cast, and
written. So memory is about one parameter, and never the model.

Run as a single process (the default), it writes unsharded chunks, which any TP/PP loads. Then
`--tp/--pp` only validate that the model divides at that layout. Under `torchrun
--nproc-per-node T*P`, each rank writes its own TP/PP shard, in parallel, so a trainer at that
layout reads exactly its own bytes.

Before any tensor is read, the source is checked and any problem is an error naming the file
and tensor: truncated files, a shard in the index that is missing, tensors the config does not
account for, missing tensors, and shapes that disagree with config.json. Afterwards, every
source tensor must have been consumed and every checkpoint tensor written.

The output appears whole or not at all (`bridge.output_dir`). The checkpoint is written into a
staging folder beside `--out` and renamed into place once it is complete and checked. A
non-empty `--out` is refused: converting into a trained checkpoint would leave the new weights
beside its old optimizer state, and a resume would pair them. `--overwrite` replaces the whole
folder, optimizer state included. The sidecar records a checksum of every file
(`agpo_megatron.checkpoint.checksums`), which the loaders verify.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf_to_megatron", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    p.add_argument(
        "--out", required=True, type=Path, help="output checkpoint directory: new or empty, unless --overwrite"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out as a whole (atomically, once the new checkpoint is complete)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate / shard for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate / shard for")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="stored dtype; auto = that of the HF tensors (config.json's torch_dtype if mixed)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Conversion is CPU work, and the meta-device model build needs Megatron's CPU path
    # (on a GPU it allocates on CUDA explicitly). Hide GPUs before torch initializes CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if world not in (1, args.tp * args.pp):
            raise ValueError(f"run as 1 process or as tp*pp={args.tp * args.pp} ranks, not {world}")
        start = time.perf_counter()
        check_out(args.out, args.hf_dir, overwrite=args.overwrite)
        src = inspect_source(args.hf_dir, tp=args.tp, pp=args.pp)  # bad input fails before anything heavy
        layout = init_model_parallel(args.tp if world > 1 else 1, args.pp if world > 1 else 1, seed=0)
        stats = convert_hf_to_megatron(src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # our checks' errors and unusable paths: the message is the report
        print(f"hf_to_megatron: error: {e}", file=sys.stderr, flush=True)
        return 2
    if layout.rank == 0:
        print(
            f"hf_to_megatron: {stats['tensors']} HF tensors, {stats['bytes'] / 1e9:.2f} GB -> {args.out} "
            f"({stats['dtype']}, chunks laid out for TP={layout.tp}/PP={layout.pp}; loads at any TP/PP) "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    if world > 1:
        exit_cleanly(0)
    return 0


# ---- the conversion (inside an initialized world of 1 or tp*pp ranks) --------------------------


def convert_hf_to_megatron(
    src: Source, out: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> dict[str, Any]:
    """Convert a checked source (`inspect_source`); collective over the current world, which
    Megatron's parallel state lays out. Returns {'tensors', 'bytes', 'dtype'} (global).

    `out` must be new or empty unless `overwrite`; it is replaced whole once the new checkpoint
    is complete (see the module docstring)."""
    import torch.distributed as dist

    from agpo_megatron.bridge import output_dir
    from agpo_megatron.checkpoint import CheckpointError
    from agpo_megatron.runtime.parallel import comm_device

    out = Path(out)
    check_out(out, src.dir, overwrite=overwrite)  # on every rank, before anything is written
    rank = dist.get_rank()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = output_dir.make_staging(out)
        except ValueError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0, device=comm_device())
    if isinstance(box[0], Exception):
        raise box[0]
    staging = box[0]
    try:
        stats = _convert(src, staging, dtype)
        dist.barrier()
        if rank == 0:
            output_dir.commit(staging, out)
        dist.barrier()
    except BaseException as e:
        if rank == 0:
            output_dir.discard(staging)
        if isinstance(e, CheckpointError):  # name the files as the user knows them, not the staging folder
            raise CheckpointError(str(e).replace(str(staging), str(out))) from None
        raise
    return stats


def check_out(out: Path, hf_dir: Path, *, overwrite: bool) -> None:
    """Refuse an `out` that is not new or empty, unless `overwrite`; reads only (any rank calls it).

    NOTE: never into an existing checkpoint: the message says what `out` holds.
    """
    from agpo_megatron.bridge import output_dir
    from agpo_megatron.checkpoint import metadata

    held = ""
    if (Path(out) / "metadata.json").is_file() or (Path(out) / metadata.SIDECAR).is_file():
        try:
            meta = metadata.read_meta(out)
        except ValueError:
            meta = None
        what = f", step {meta.step}, source {meta.source}" if meta is not None else ""
        held = (
            f" (it holds a Megatron checkpoint{what}; hf_to_megatron never writes into an existing "
            "checkpoint, whose optimizer state would no longer match its weights)"
        )
    output_dir.check_target(out, overwrite=overwrite, inputs=(Path(hf_dir),), held=held)


def _convert(src: Source, out: Path, dtype: str) -> dict[str, Any]:
    """The conversion into the (staging) folder `out`."""
    import torch
    import torch.distributed as dist

    from agpo_megatron.bridge import names
    from agpo_megatron.checkpoint import CheckpointError, convert_io
    from agpo_megatron.checkpoint.metadata import CheckpointMeta
    from agpo_megatron.runtime.parallel import current_layout

    hf_dir, arch, reader = src.dir, src.arch, src.reader
    store_dtype = _resolve_dtype(dtype, src.tensors, arch)

    lay = current_layout()
    model = convert_io.abstract_model(arch, store_dtype)
    rules = {r.megatron: r for r in names.param_rules(arch, "local")}
    offset = names.layer_range(arch, lay.pp_rank, lay.pp).start
    first_expert = names.expert_offset(arch, lay.ep_rank, lay.ep)
    consumed: set[str] = set()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}

    def materialize(name: str) -> torch.Tensor:
        gname = names.to_global_name(name, offset, first_expert)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            # The last stage's copy of a tied head (PP > 1) is the embedding.
            rule = names.ParamRule(gname, ("model.embed_tokens.weight",), "copy", 0)
        elif gname in rules:
            rule = rules[gname]
        else:
            raise CheckpointError(f"model parameter {gname!r} has no HF mapping in bridge/names.py")
        full = names.hf_to_megatron(rule, [reader.get(n) for n in rule.hf], arch)
        reader.close()  # unmap: what stays mapped is only what `full` still references
        # The parameter's own dtype: Megatron's local-spec norms stay fp32 in a bf16 model.
        # A routed expert's weight splits over the expert-tensor-parallel group, the rest over TP.
        tp_rank, tp = (lay.etp_rank, lay.etp) if rule.expert is not None else (lay.tp_rank, lay.tp)
        local = names.shard(rule, full, tp_rank, tp).to(dtypes[name])
        if not local.is_contiguous() or local.untyped_storage().nbytes() != local.nbytes:
            local = local.clone(memory_format=torch.contiguous_format)  # and let `full` go
        consumed.update(rule.hf)
        return local

    meta = CheckpointMeta(
        step=0, source=f"hf:{hf_dir.resolve()}", params_dtype=store_dtype, tp=lay.tp, pp=lay.pp, hf_config=src.config
    )
    convert_io.save_from_source(out, model, materialize, meta, hf_assets_from=hf_dir)

    # Every source tensor consumed (each rank saw only its own shard of the model).
    everyone: list[set[str]] = [set() for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, consumed)
    unread = set(src.tensors) - set().union(*everyone) - _ignorable(src.tensors, arch)
    if unread:
        raise CheckpointError(f"{hf_dir}: {len(unread)} tensor(s) were never converted: {sorted(unread)[:8]}")
    # Every target tensor written, with the shape the trainer's model expects.
    expected = convert_io.ParamReader(out, model, verify=False).expected()  # our own output: no second read
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, expected)
    check_stored(out, {k: v for d in gathered for k, v in d.items()}, "the converted model")
    return {"tensors": len(src.tensors), "bytes": sum(t.nbytes for t in src.tensors.values()), "dtype": store_dtype}


# ---- checks ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A checked HF model directory."""

    dir: Path
    """The directory."""
    arch: Any
    """models.hf_config.ModelArch from config.json."""
    config: dict[str, Any]
    """config.json as read (kept verbatim in the checkpoint's sidecar)."""
    reader: Any
    """bridge.hf_io.HFCheckpointReader over the safetensors."""
    tensors: dict[str, _SourceTensor]
    """Every HF tensor: file, dtype, shape (from the headers; no data read)."""


def inspect_source(hf_dir: str | Path, *, tp: int = 1, pp: int = 1) -> Source:
    """All the checks on an HF directory that need no tensor data and no process group."""
    from agpo_megatron.bridge.hf_io import HFCheckpointReader
    from agpo_megatron.models.hf_config import read_arch

    hf_dir = Path(hf_dir)
    arch = read_arch(hf_dir)  # unsupported model types are refused here, with the supported list
    config = json.loads((hf_dir / "config.json").read_text())
    check_supported(config, hf_dir / "config.json")
    check_layout(arch, tp, pp, hf_dir / "config.json")
    tensors = check_files(hf_dir)  # before HFCheckpointReader, whose errors name no tensor
    reader = HFCheckpointReader(hf_dir)
    check_source(tensors, reader, arch)
    return Source(dir=hf_dir, arch=arch, config=config, reader=reader, tensors=tensors)


def check_files(hf_dir: Path) -> dict[str, _SourceTensor]:
    """Every tensor's file, dtype and shape, from the index and the headers (no data read).

    Missing shards, truncated files, and index entries absent from their file are errors that
    name the file and the tensor.
    """
    from agpo_megatron.checkpoint import CheckpointError

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    elif (hf_dir / "model.safetensors").is_file():
        weight_map = {n: "model.safetensors" for n in read_safetensors_header(hf_dir / "model.safetensors")}
    else:
        raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, _SourceTensor] = {}
    for file, listed in sorted(by_file.items()):
        path = hf_dir / file
        if not path.is_file():
            raise CheckpointError(
                f"{path}: shard missing; the index places {len(listed)} tensor(s) in it, e.g. {sorted(listed)[:3]}"
            )
        header = read_safetensors_header(path, listed)
        for name in listed:
            if name not in header:
                raise CheckpointError(f"{path}: the index places tensor {name!r} in this file, but it is not there")
            tensors[name] = _SourceTensor(path, header[name]["dtype"], tuple(header[name]["shape"]))
    return tensors


def check_supported(config: dict[str, Any], source: Path) -> None:
    """Refuse config fields that the name table (bridge/names.py) has no tensors for."""
    from agpo_megatron.models.hf_config import UnsupportedModelError

    problems = []
    if config.get("quantization_config"):
        problems.append("quantized weights (quantization_config); convert the unquantized model")
    if config.get("mlp_bias"):
        problems.append("mlp_bias=true (MLP biases)")
    if config.get("model_type") in ("llama", "qwen3") and config.get("attention_bias"):
        problems.append("attention_bias=true (q/k/v/o biases; only Qwen2's q/k/v bias is mapped)")
    if config.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    if problems:
        raise UnsupportedModelError(
            f"{source}: not supported: {'; '.join(problems)}. Supported: qwen2 (q/k/v bias, tied or "
            "untied), llama (rope_scaling llama3), qwen3 (qk-norm), qwen3_moe (routed SwiGLU experts), "
            "full attention"
        )


def check_layout(arch, tp: int, pp: int, source: Path) -> None:
    """The divisibility Megatron needs at TP=tp / PP=pp, as one clear error."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {tp} and {pp}")
    bad = [
        f"{what}={n} is not divisible by {by_name}={by}"
        for what, n, by_name, by in [
            ("num_attention_heads", arch.num_attention_heads, "tp", tp),
            ("num_key_value_heads", arch.num_query_groups, "tp", tp),
            # An MoE model has no dense MLP: its experts split over ETP, set in the trainer's layout.
            ("intermediate_size", 0 if arch.is_moe else arch.ffn_hidden_size, "tp", tp),
            ("vocab_size", arch.vocab_size, "tp", tp),
            ("num_hidden_layers", arch.num_layers, "pp", pp),
        ]
        if n % by
    ]
    if bad:
        raise ValueError(f"{source}: cannot lay this model out at TP={tp}/PP={pp}: {'; '.join(bad)}")


class _SourceTensor:
    __slots__ = ("file", "dtype", "shape")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...]):
        self.file, self.dtype, self.shape = file, dtype, shape

    @property
    def nbytes(self) -> int:
        n = _ST_ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


_ST_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_ST_TO_TORCH = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def read_safetensors_header(path: Path, listed: list[str] = ()) -> dict[str, dict]:
    """The header of one safetensors file, checked against the file's size.

    A truncated file is reported with the first tensor whose bytes are cut off (or, if the
    header itself is cut, with the tensors that `listed` says the file should hold).
    """
    from agpo_megatron.checkpoint import CheckpointError

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            hint = f"; it should hold e.g. {sorted(listed)[:3]}" if listed else ""
            raise CheckpointError(f"{path}: truncated safetensors file: the header is cut off ({size} bytes){hint}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][1]):
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} needs data bytes up to {end}, "
                f"the file holds {data_size}"
            )
    return header


def check_source(source: dict[str, _SourceTensor], reader, arch) -> None:
    """The tensors are exactly those config.json implies, with the shapes it implies."""
    import torch

    from agpo_megatron.bridge import names
    from agpo_megatron.checkpoint import CheckpointError

    # Names and shapes implied by config.json, through the same table the conversion uses.
    expected: dict[str, tuple[int, ...]] = {}
    for rule in names.param_rules(arch, "local"):
        full = torch.empty(names.full_shape(rule, arch), device="meta")
        for hf_name, t in zip(rule.hf, names.megatron_to_hf(rule, full, arch)):
            expected[hf_name] = tuple(t.shape)
    cfg = (
        f"config.json: hidden_size={arch.hidden_size}, intermediate_size={arch.ffn_hidden_size}, "
        f"num_attention_heads={arch.num_attention_heads}, num_key_value_heads={arch.num_query_groups}, "
        f"head_dim={arch.head_dim}, vocab_size={arch.vocab_size}, num_hidden_layers={arch.num_layers}, "
        f"tie_word_embeddings={arch.tie_word_embeddings}"
    )
    extra = sorted(set(source) - set(expected) - _ignorable(source, arch))
    if extra:
        first = extra[0]
        raise CheckpointError(
            f"{source[first].file}: tensor {first!r} has no place in the model described by {cfg} "
            f"({len(extra)} such tensor(s): {extra[:5]})"
        )
    missing = sorted(set(expected) - set(source))
    if missing:
        raise CheckpointError(
            f"{reader.dir}: tensor {missing[0]!r} is missing; {cfg} implies it ({len(missing)} missing: {missing[:5]})"
        )
    for name, shape in expected.items():
        if source[name].shape != shape:
            raise CheckpointError(
                f"{source[name].file}: tensor {name!r} has shape {source[name].shape}, but {cfg} implies {shape}"
            )
        if source[name].dtype not in _ST_TO_TORCH:
            raise CheckpointError(
                f"{source[name].file}: tensor {name!r} has dtype {source[name].dtype}; "
                f"supported: {sorted(_ST_TO_TORCH)}"
            )
    if arch.tie_word_embeddings and "lm_head.weight" in source:
        # A tied model that still stores lm_head: harmless only if it *is* the embedding.
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise CheckpointError(
                f"{source['lm_head.weight'].file}: tensor 'lm_head.weight' differs from "
                "'model.embed_tokens.weight' but config.json says tie_word_embeddings=true"
            )


def _ignorable(source: dict, arch) -> set[str]:
    """Tensors that carry no weights of their own: rotary caches, and a tied model's copy of
    the embedding (checked equal in `check_source`)."""
    skip = {n for n in source if n.endswith("rotary_emb.inv_freq")}
    if arch.tie_word_embeddings and "lm_head.weight" in source:
        skip.add("lm_head.weight")
    return skip


def check_stored(ckpt: Path, expected: dict[str, tuple[tuple[int, ...], Any]], what: str) -> None:
    """The checkpoint holds exactly the model tensors `expected` (key -> (global shape, dtype)),
    besides optimizer state."""
    from agpo_megatron.checkpoint import CheckpointError
    from agpo_megatron.checkpoint.metadata import is_optimizer_key, stored_tensors

    stored = stored_tensors(ckpt)
    for key, (shape, _dtype) in expected.items():
        if key not in stored:
            raise CheckpointError(f"{ckpt}: tensor {key!r} of {what} is not in the checkpoint")
        if stored[key][0] != tuple(shape):
            raise CheckpointError(
                f"{ckpt}: tensor {key!r} has global shape {stored[key][0]}, {what} expects {tuple(shape)}"
            )
    leftover = sorted(k for k in stored if k not in expected and not is_optimizer_key(k))
    if leftover:
        raise CheckpointError(
            f"{ckpt}: tensor {leftover[0]!r} is not part of {what} ({len(leftover)} such: {leftover[:5]})"
        )


def _resolve_dtype(dtype: str, source: dict[str, _SourceTensor], arch) -> str:
    if dtype != "auto":
        return dtype
    found = {_ST_TO_TORCH[t.dtype] for t in source.values()}
    return found.pop() if len(found) == 1 else arch.torch_dtype


if __name__ == "__main__":
    sys.exit(main())
