"""Megatron torch_dist checkpoint (any TP/PP) -> HF safetensors, streamed one parameter at a time.

    megatron_to_hf --ckpt ckpt/qwen7b --out hf/qwen7b-rl [--hf-config-from Qwen2.5-Math-7B]

One process, whatever layout the checkpoint was saved at. The checkpoint is read through the
trainer's own loader, one parameter at a time, as a TP=1/PP=1 meta model would hold it: the full
tensor. That parameter is split into HF tensors by `bridge.names`, cast to the export dtype, and
streamed into size-capped safetensors shards (`bridge.hf_writer`). Memory is about one
parameter.

config.json, the tokenizer and generation_config come from the checkpoint itself (`agpo_meta.json`
and `hf_assets/`, written by hf_to_megatron and by the trainer's save), or from `--hf-config-from`.
Before anything is written, the checkpoint's tensors are matched against that config, and any
mismatch is an error naming the tensor: a missing tensor, a different shape, or a tensor that
the config has no place for. Optimizer state is skipped.

Before that, every file of the checkpoint is checked against the checksums in its sidecar
(`--no-verify` skips it). The export is written into a staging folder beside `--out` and renamed
into place when complete (`bridge.output_dir`). A non-empty `--out` is refused unless
`--overwrite` is given, and then it is replaced whole: no shard or index of an earlier export
survives beside the new files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from agpo_megatron.bridge.hf_writer import DEFAULT_MAX_SHARD_BYTES

    p = argparse.ArgumentParser(prog="megatron_to_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, type=Path, help="Megatron torch_dist checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output HF directory: new or empty, unless --overwrite")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out as a whole (atomically, once the new export is complete)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the checkpoint's files against the checksums in its agpo_meta.json",
    )
    p.add_argument(
        "--hf-config-from",
        type=Path,
        default=None,
        help="HF directory whose config.json / tokenizer to use (default: those stored in the checkpoint)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="export dtype; auto = config.json's torch_dtype")
    p.add_argument(
        "--max-shard-bytes",
        type=int,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="safetensors shard size cap in bytes (default 5e9, as transformers)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU work; see hf_to_megatron.main
    from agpo_megatron.runtime.parallel import init_model_parallel

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError("runs as one process (it reads any layout); do not launch it with torchrun")
        start = time.perf_counter()
        init_model_parallel(1, 1, seed=0)
        stats = convert_megatron_to_hf(
            args.ckpt,
            args.out,
            hf_config_from=args.hf_config_from,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes,
            overwrite=args.overwrite,
            verify=args.verify,
        )
    except (ValueError, OSError) as e:  # our checks' errors and unusable paths: the message is the report
        print(f"megatron_to_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(
        f"megatron_to_hf: {stats['tensors']} HF tensors, {stats['bytes'] / 1e9:.2f} GB ({stats['dtype']}) "
        f"in {len(stats['files'])} file(s) -> {args.out} in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 0


def convert_megatron_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    hf_config_from: str | Path | None = None,
    dtype: str = "auto",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Export; needs an initialized world of one process at TP=1/PP=1. Returns
    {'tensors', 'bytes', 'dtype', 'files'}. `out` must be new or empty unless `overwrite`;
    `verify` checks the checkpoint's checksums first."""
    import torch

    from agpo_megatron.bridge import hf_writer, names, output_dir
    from agpo_megatron.checkpoint import CheckpointError, convert_io, metadata
    from agpo_megatron.checkpoint.hf_assets import copy_hf_assets
    from agpo_megatron.models.hf_config import arch_from_hf_dict
    from checkpoints_conversion.hf_to_megatron import check_stored, check_supported

    ckpt = metadata.require_checkpoint(ckpt)
    inputs = (ckpt,) if hf_config_from is None else (ckpt, Path(hf_config_from))
    output_dir.check_target(out, overwrite=overwrite, inputs=inputs)  # before the long part
    if verify:
        metadata.verify_checkpoint(ckpt)
    meta = metadata.read_meta(ckpt)
    if hf_config_from is not None:
        config_path = Path(hf_config_from) / "config.json"
        config = json.loads(config_path.read_text())
        assets = Path(hf_config_from)
    elif meta is not None and meta.hf_config is not None:
        config_path = ckpt / metadata.SIDECAR
        config = meta.hf_config
        assets = ckpt / metadata.ASSETS_DIR
    else:
        raise CheckpointError(
            f"{ckpt}: no HF config stored with this checkpoint (no {metadata.SIDECAR} "
            "with hf_config); pass --hf-config-from <HF model dir>"
        )
    arch = arch_from_hf_dict(config, str(config_path))
    check_supported(config, config_path)

    # Read the model in the dtype it is stored in: a different dtype here would cast on load.
    stored = metadata.stored_tensors(ckpt)
    if "embedding.word_embeddings.weight" not in stored:
        raise CheckpointError(f"{ckpt}: no 'embedding.word_embeddings.weight': not a GPT model checkpoint")
    store_dtype = str(stored["embedding.word_embeddings.weight"][1]).removeprefix("torch.")
    model = convert_io.abstract_model(arch, store_dtype)
    reader = convert_io.ParamReader(ckpt, model, verify=False)  # verified above, before any other read
    check_stored(ckpt, reader.expected(), f"the model of {config_path}")

    rules = names.param_rules(arch, "local")
    unmapped = set(reader.names()) ^ {r.megatron for r in rules}
    if unmapped:  # the name table and the model disagree: a bug in bridge/names.py
        raise CheckpointError(f"bridge/names.py and the model disagree on {sorted(unmapped)[:5]}")
    out_dtype = getattr(torch, arch.torch_dtype if dtype == "auto" else dtype)
    specs = []  # the export plan, from config.json alone: shapes via the same reshape rules, on meta
    for r in rules:
        full = torch.empty(names.full_shape(r, arch), device="meta")
        specs += [
            hf_writer.TensorSpec(n, tuple(t.shape), out_dtype)
            for n, t in zip(r.hf, names.megatron_to_hf(r, full, arch))
        ]

    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    with output_dir.staged(out, overwrite=overwrite, inputs=inputs) as staging:
        with hf_writer.HFCheckpointWriter(staging, specs, **kw) as writer:
            for rule in rules:
                full = reader.get(rule.megatron)
                for hf_name, t in zip(rule.hf, names.megatron_to_hf(rule, full, arch)):
                    writer.write(hf_name, t.to(out_dtype))
                del full
        hf_writer.write_hf_config(staging, config, out_dtype)
        if assets.is_dir():
            copy_hf_assets(assets, staging)
    return {
        "tensors": len(specs),
        "bytes": writer.bytes_written,
        "dtype": str(out_dtype).removeprefix("torch."),
        "files": [s.file for s in writer.shards],
    }


if __name__ == "__main__":
    sys.exit(main())
