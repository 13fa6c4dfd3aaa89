"""Weight-sync throughput: Megatron (TP/PP-sharded) -> full HF tensors -> colocated vLLM.

    torchrun --nproc-per-node=2 benchmarks/weight_sync.py --tp 2 --pp 1
    torchrun --nproc-per-node=2 benchmarks/weight_sync.py --model qwen3_moe --tp 1 --ep 2

Measures, on one tiny-but-not-trivial model (default: hidden 512, 4 layers, vocab 8192, GQA
8/4 heads, fp32, about 84 MB; `--model qwen3_moe`: the same with every MLP a Qwen3-MoE layer of
`--experts` experts of width `--moe-ffn`, top-2, about 240 MB at 16 x 512, whose experts are
split over `--ep` ranks and gathered by the export, one broadcast per expert tensor):

- memcpy: a single-process `Tensor.copy_` of the same bytes, tensor by tensor, on rank 0 while
  the other ranks wait: the local bandwidth the export is compared against;
- one all_gather: the TP-sharded bytes in a single collective call, the transport's ceiling
  (gloo over loopback TCP on CPU);
- export: `iter_hf_buckets` consumed to the end (TP all-gather, PP broadcast, q/k/v and
  gate/up re-layout), per bucket size; every rank receives the whole model;
- vLLM load: `VLLMEngine.update_weights` from tensors already in memory (vLLM's own ingest);
- full sync: `sync_weights` into the engine (export + vLLM load, streamed).

Each number is the median of --repeats runs on rank 0; GB/s counts the model's bytes once.
Prints a markdown table (ratios against memcpy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.export import iter_hf_buckets, sync_weights
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="Megatron expert-parallel size (--model qwen3_moe)")
    p.add_argument("--rollout-tp", type=int, default=2, help="vLLM tensor-parallel size")
    p.add_argument("--model", choices=["qwen2", "qwen3_moe"], default="qwen2")
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer (qwen3_moe)")
    p.add_argument("--moe-ffn", type=int, default=512, help="each expert's FFN width (qwen3_moe)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--bucket-mib", type=float, nargs="+", default=[1, 16, 512], help="bucket sizes to time (MiB)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work-dir", default="/tmp/agpo_weight_sync_bench", help="where the HF model is written")
    return p.parse_args()


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, barrier-aligned across ranks."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    dist.barrier()
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    lay = init_model_parallel(args.tp, args.pp, seed=1, ep=args.ep)
    rank = dist.get_rank()
    hf_dir = Path(args.work_dir) / args.model
    moe = (
        dict(num_experts=args.experts, num_experts_per_tok=2, moe_intermediate_size=args.moe_ffn)
        if args.model == "qwen3_moe"
        else {}
    )
    if rank == 0:
        from agpo_megatron.data.synthetic import build_tokenizer
        from agpo_megatron.models.tiny import save_tiny_hf_model

        save_tiny_hf_model(
            hf_dir,
            args.model,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_layers=args.layers,
            num_heads=8,
            num_kv_heads=4,
            vocab_size=args.vocab,
            tokenizer=build_tokenizer(Path(args.work_dir) / "tok"),
            **moe,
        )
    dist.barrier()
    arch = read_arch(hf_dir)
    model = build.build_gpt(
        arch,
        ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=128),
        ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep),
    )
    load_hf_weights(
        model,
        arch,
        HFCheckpointReader(hf_dir),
        tp_rank=lay.tp_rank,
        tp=args.tp,
        pp_rank=lay.pp_rank,
        pp=args.pp,
        ep_rank=lay.ep_rank,
        ep=args.ep,
    )

    # The model's HF tensors, materialised once: shapes for the memcpy baseline, input for the
    # vLLM-only timing.
    tensors = [(n, t.clone()) for b in iter_hf_buckets(model, arch) for n, t in b]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    rows: list[tuple[str, float]] = []

    dst = [torch.empty_like(t) for _, t in tensors]

    def memcpy() -> None:
        if rank == 0:
            for d, (_, t) in zip(dst, tensors):
                d.copy_(t)

    rows.append(("memcpy (1 process, same tensors)", timed(memcpy, args.repeats)))
    dst.clear()  # free the copies before the next measurement

    if args.tp > 1 or args.ep > 1:
        # The transport's own ceiling: the model's bytes, sharded over TP (or EP), in one all_gather call.
        from megatron.core import parallel_state as mpu

        size, what = (args.tp, "TP") if args.tp > 1 else (args.ep, "EP")
        group = mpu.get_tensor_model_parallel_group() if args.tp > 1 else mpu.get_expert_model_parallel_group()
        flat = torch.empty(total // size // 4, dtype=torch.float32)
        gathered = [torch.empty_like(flat) for _ in range(size)]
        rows.append(
            (
                f"one all_gather of the same bytes ({dist.get_backend()}, {what} group)",
                timed(lambda: dist.all_gather(gathered, flat, group=group), args.repeats),
            )
        )
        del flat, gathered

    for mib in args.bucket_mib:

        def export(mib=mib) -> None:
            for _ in iter_hf_buckets(model, arch, bucket_bytes=int(mib * 2**20)):
                pass

        rows.append((f"export, {mib:g} MiB buckets", timed(export, args.repeats)))

    from agpo_megatron.rollout.vllm_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(str(hf_dir), rollout_tp=args.rollout_tp, dtype="float32", max_model_len=128)
    startup = time.perf_counter() - start
    rows.append(
        (
            "vLLM load (update_weights, tensors in memory)",
            timed(lambda: engine.update_weights(iter(tensors)), args.repeats),
        )
    )
    for mib in (args.bucket_mib[0], args.bucket_mib[-1]):
        rows.append(
            (
                f"full sync (sync_weights, {mib:g} MiB buckets)",
                timed(lambda mib=mib: sync_weights(model, arch, engine, bucket_bytes=int(mib * 2**20)), args.repeats),
            )
        )

    if rank == 0:
        base = rows[0][1]
        experts = f", {args.experts} experts of width {args.moe_ffn} (top-2)" if moe else ""
        print(
            f"\nmodel: {args.model}, hidden {args.hidden}, {args.layers} layers{experts}, vocab {args.vocab}, "
            f"{len(tensors)} tensors, {total / 1e6:.1f} MB fp32; Megatron TP={args.tp} PP={args.pp} EP={args.ep}, "
            f"vLLM TP={args.rollout_tp}, "
            f"world {dist.get_world_size()}; median of {args.repeats}; vLLM engine start-up {startup:.1f} s\n"
        )
        print("| path | time (ms) | GB/s | vs memcpy |")
        print("|---|---:|---:|---:|")
        for name, sec in rows:
            print(f"| {name} | {sec * 1e3:.1f} | {total / sec / 1e9:.2f} | {base / sec:.3f}x |")
        sys.stdout.flush()
    exit_cleanly(0)


if __name__ == "__main__":
    main()
