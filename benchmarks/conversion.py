"""Checkpoint conversion throughput and peak memory at Qwen2.5-7B (or Qwen3-30B-A3B) layer shapes.

    python benchmarks/conversion.py --work /tmp/conversion_bench --layers 4
    python benchmarks/conversion.py --work /tmp/conversion_bench_moe --layers 2 --shape qwen3-30b-a3b

The source is a synthetic bf16 checkpoint with Qwen2.5-7B's real shapes: hidden 3584, FFN 18944,
28 heads in 4 KV groups, vocab 152064, untied head, q/k/v bias. With `--shape qwen3-30b-a3b`,
the mixture-of-experts Qwen3-30B-A3B's: hidden 2048, 32 heads of 128 in 4 KV groups with q/k
norms, a router and 128 experts of width 768 per layer (384 expert tensors, 1.2 GB a layer),
vocab 151936, untied head. Only the depth is reduced (`--layers`). It is written with
`safetensors` directly, in shards of at most 2 GB, with an index; no model is built. The tensors
are slices of one random 64 MB pool: the bytes are irrelevant to speed, and generating 4 GB of
random numbers on 2 cores would take longer than the conversion.

Each measurement runs in a fresh subprocess. It times only the work (reading, converting,
writing), after its imports, and reports its own peak RSS (VmHWM):
  raw   every tensor read once with safetensors (`get_tensor`, copied into a reused buffer)
  copy  the same, each tensor's bytes written to a new file (fsynced): a conversion's floor
        of work, reading plus writing, without any format
  h2m   hf_to_megatron in one process (`convert_hf_to_megatron`), checksums taken while writing
  m2h   megatron_to_hf (`convert_megatron_to_hf`), checksums verified first
With `--checksums`, the same two with the checksum work switched off, for the overhead:
  h2m_nohash    hf_to_megatron with a no-op hasher in place of blake3 / sha256
  m2h_noverify  megatron_to_hf with verify=False (`--no-verify`)
  verify        `verify_checkpoint` alone: read and hash every file of the checkpoint
Targets: conversion >= 70% of the raw read speed; peak RSS <= 2 x the largest tensor + 1 GB.

Page cache: dropping it needs privileges this machine does not grant, so every measurement
runs on a warm cache. All source files are read once before timing, so the raw read and both
conversions read from memory. Writes go through the page cache too, and each shard and
checkpoint file is fsynced, so the disk write is in the time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QWEN25_7B = dict(hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064)
QWEN3_30B_A3B = dict(hidden=2048, head_dim=128, heads=32, kv_heads=4, vocab=151936, experts=128, moe_ffn=768)


def source_config(shape: str, layers: int) -> dict:
    return qwen25_7b_config(layers) if shape == "qwen2.5-7b" else qwen3_30b_a3b_config(layers)


def source_shapes(shape: str, layers: int) -> dict[str, tuple[int, ...]]:
    return hf_shapes(layers) if shape == "qwen2.5-7b" else moe_shapes(layers)


def qwen3_30b_a3b_config(layers: int) -> dict:
    m = QWEN3_30B_A3B
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_act": "silu",
        "hidden_size": m["hidden"],
        "intermediate_size": 6144,
        "head_dim": m["head_dim"],
        "num_attention_heads": m["heads"],
        "num_key_value_heads": m["kv_heads"],
        "num_hidden_layers": layers,
        "num_experts": m["experts"],
        "num_experts_per_tok": 8,
        "moe_intermediate_size": m["moe_ffn"],
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": m["vocab"],
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def moe_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    m = QWEN3_30B_A3B
    h, d, f = m["hidden"], m["head_dim"], m["moe_ffn"]
    shapes = {"model.embed_tokens.weight": (m["vocab"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (m["heads"] * d, h),
                p + "self_attn.k_proj.weight": (m["kv_heads"] * d, h),
                p + "self_attn.v_proj.weight": (m["kv_heads"] * d, h),
                p + "self_attn.o_proj.weight": (h, m["heads"] * d),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "mlp.gate.weight": (m["experts"], h),
            }
        )
        for e in range(m["experts"]):
            q = f"{p}mlp.experts.{e}."
            shapes.update({q + "gate_proj.weight": (f, h), q + "up_proj.weight": (f, h)})
            shapes[q + "down_proj.weight"] = (h, f)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (m["vocab"], h)
    return shapes


def qwen25_7b_config(layers: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": QWEN25_7B["hidden"],
        "intermediate_size": QWEN25_7B["ffn"],
        "num_attention_heads": QWEN25_7B["heads"],
        "num_key_value_heads": QWEN25_7B["kv_heads"],
        "num_hidden_layers": layers,
        "vocab_size": QWEN25_7B["vocab"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    }


def hf_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, f, v = QWEN25_7B["hidden"], QWEN25_7B["ffn"], QWEN25_7B["vocab"]
    hd = h // QWEN25_7B["heads"]
    kv = QWEN25_7B["kv_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_source(out: Path, layers: int, shard_bytes: int = 2 * 10**9, shape: str = "qwen2.5-7b") -> int:
    """Write the synthetic checkpoint; returns the size of its largest tensor in bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    shapes = source_shapes(shape, layers)
    groups, size = [[]], 0
    for name, dims in shapes.items():
        n = 2 * _numel(dims)
        if size + n > shard_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, offset = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            numel = _numel(shapes[name])
            idx = (torch.arange(numel) + offset) % pool.numel() if numel < pool.numel() else None
            tensors[name] = (pool[idx] if idx is not None else pool.repeat(numel // pool.numel() + 1)[:numel]).reshape(
                shapes[name]
            )
            offset += 7919
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
        del tensors
    total = sum(2 * _numel(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(source_config(shape, layers), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151643}))
    return max(2 * _numel(s) for s in shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- children: one measurement each, in a fresh process ---------------------------------------


def child(mode: str, work: Path, layers: int, shape: str = "qwen2.5-7b") -> None:
    if mode == "source":
        largest = make_source(work / "hf", layers, shape=shape)
        result = {"largest": largest}
    elif mode in ("raw", "copy"):
        import torch
        from safetensors import safe_open

        # safetensors maps the file; its tensors fault their pages in on first access. Copying
        # each one into a reused (already faulted) buffer is the least work that brings every
        # byte into process memory, which any converter must do.
        staging = torch.empty(0, dtype=torch.uint8)
        out = work / "copy"
        out.mkdir(exist_ok=True)
        start, nbytes = time.perf_counter(), 0
        for file in sorted((work / "hf").glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f, open(out / file.name, "wb") as dst:
                for name in f.keys():
                    t = f.get_tensor(name).reshape(-1).view(torch.uint8)
                    if mode == "raw":
                        if staging.numel() < t.numel():
                            staging = torch.zeros(t.numel(), dtype=torch.uint8)
                        staging[: t.numel()].copy_(t)
                    else:
                        dst.write(memoryview(t.numpy()))
                    nbytes += t.numel()
                    del t
                if mode == "copy":
                    dst.flush()
                    os.fsync(dst.fileno())
        result = {"seconds": time.perf_counter() - start, "bytes": nbytes}
    elif mode in ("h2m", "h2m_nohash"):
        from agpo_megatron.checkpoint import checksums
        from agpo_megatron.runtime.parallel import init_model_parallel
        from checkpoints_conversion.hf_to_megatron import convert_hf_to_megatron, inspect_source

        if mode == "h2m_nohash":
            checksums.new_hasher = lambda algo=checksums.ALGO: _NoHash()
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        init_model_parallel(1, 1, seed=0)
        start = time.perf_counter()
        stats = convert_hf_to_megatron(inspect_source(work / "hf"), work / "mcore", overwrite=True)
        result = {"seconds": time.perf_counter() - start, "bytes": stats["bytes"]}
    elif mode == "verify":
        from agpo_megatron.checkpoint.metadata import verify_checkpoint

        start = time.perf_counter()
        verify_checkpoint(work / "mcore")
        result = {
            "seconds": time.perf_counter() - start,
            "bytes": sum(p.stat().st_size for p in (work / "mcore").rglob("*") if p.is_file()),
        }
    elif mode in ("m2h", "m2h_noverify"):
        from agpo_megatron.runtime.parallel import init_model_parallel
        from checkpoints_conversion.megatron_to_hf import convert_megatron_to_hf

        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        init_model_parallel(1, 1, seed=0)
        start = time.perf_counter()
        stats = convert_megatron_to_hf(work / "mcore", work / "hf_export", verify=mode == "m2h")
        result = {"seconds": time.perf_counter() - start, "bytes": stats["bytes"]}
    else:
        raise ValueError(mode)
    # This process's own peak RSS. NOTE: not rusage: Linux carries the parent's high-water mark
    # into a child's ru_maxrss across fork and exec.
    status = Path("/proc/self/status").read_text()
    result["peak_rss"] = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) * 1024
    print("RESULT " + json.dumps(result), flush=True)


class _NoHash:
    """A hasher that does nothing: hf_to_megatron without the cost of its checksums."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def measure(mode: str, work: Path, layers: int = 0, shape: str = "qwen2.5-7b") -> dict:
    """Run one measurement in a fresh process; it reports its own time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--work", str(work), "--layers", str(layers), "--shape", shape],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def warm(paths: list[Path]) -> int:
    """Read files once so that what follows reads from the page cache; returns bytes read."""
    n = 0
    buf = bytearray(64 * 2**20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/conversion_bench"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shape", choices=["qwen2.5-7b", "qwen3-30b-a3b"], default="qwen2.5-7b", help="the layer shapes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--checksums",
        action="store_true",
        help="also run both conversions without their checksum work (h2m_nohash, m2h_noverify)",
    )
    p.add_argument(
        "--child",
        choices=["source", "raw", "copy", "h2m", "m2h", "h2m_nohash", "m2h_noverify", "verify"],
        help=argparse.SUPPRESS,
    )
    args = p.parse_args()
    if args.child:
        child(args.child, args.work, args.layers, args.shape)
        return

    for d in ("hf", "copy", "mcore", "hf_export"):
        shutil.rmtree(args.work / d, ignore_errors=True)
    t = time.perf_counter()
    largest = measure("source", args.work, args.layers, args.shape)["largest"]  # a child: this process stays small
    print(
        f"source: {args.layers} layers at {args.shape} shapes in {time.perf_counter() - t:.1f} s; "
        f"largest tensor {largest / 1e9:.2f} GB",
        flush=True,
    )
    warm(sorted((args.work / "hf").glob("*.safetensors")))
    # Rounds of every measurement, each in a fresh process; the median of each is reported.
    # NOTE: the machine is shared; interleaving the rounds spreads other jobs' load over all steps.
    steps = {"raw read": "raw", "raw copy (read+write)": "copy", "hf_to_megatron": "h2m", "megatron_to_hf": "m2h"}
    if args.checksums:
        steps.update(
            {
                "verify_checkpoint": "verify",
                "hf_to_megatron, no hashing": "h2m_nohash",
                "megatron_to_hf --no-verify": "m2h_noverify",
            }
        )
    runs: dict[str, list[dict]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, mode in steps.items():
            runs[name].append(measure(mode, args.work))
            if mode in ("copy", "m2h", "m2h_noverify"):  # outputs nothing reads again: free the space (tmpfs is RAM)
                shutil.rmtree(args.work / ("copy" if mode == "copy" else "hf_export"))
    bound = 2 * largest + 2**30
    raw_gbps = statistics.median(r["bytes"] / r["seconds"] for r in runs["raw read"]) / 1e9
    rows = []
    for name, rs in runs.items():
        gbps = sorted(r["bytes"] / r["seconds"] / 1e9 for r in rs)
        rows.append(
            {
                "step": name,
                "GB": rs[0]["bytes"] / 1e9,
                "GB/s": statistics.median(gbps),
                "GB/s_range": [gbps[0], gbps[-1]],
                "vs_raw": statistics.median(gbps) / raw_gbps,
                "peak_rss_GB": max(r["peak_rss"] for r in rs) / 1e9,
                "rss_bound_GB": bound / 1e9,
            }
        )
    print(f"{'step':<28}{'GB':>6}{'GB/s (median, range)':>24}{'vs raw':>8}{'peak RSS GB':>13}{'bound GB':>10}")
    for r in rows:
        rng = f"{r['GB/s']:.2f} ({r['GB/s_range'][0]:.2f}-{r['GB/s_range'][1]:.2f})"
        print(
            f"{r['step']:<28}{r['GB']:>6.2f}{rng:>24}{r['vs_raw']:>8.0%}{r['peak_rss_GB']:>13.2f}"
            f"{r['rss_bound_GB']:>10.2f}"
        )
    (args.work / "results.json").write_text(
        json.dumps(
            {
                "shape": args.shape,
                "layers": args.layers,
                "largest_tensor": largest,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
