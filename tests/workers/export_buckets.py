"""2-rank worker: stream HF tensors out of a TP=2 or PP=2 Megatron model with `iter_hf_buckets`.

argv: OUT_DIR BUCKET_BYTES CASE... where CASE is NAME:HF_DIR:LAYOUT[:bf16] (LAYOUT tp2 or pp2).
For each case, every rank writes OUT_DIR/NAME.rank{r}.pt: its list of buckets, each a list of
(hf_name, tensor). Every rank must receive every tensor, so the test checks both files.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.export import iter_hf_buckets
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

out_dir, bucket_bytes = Path(sys.argv[1]), int(sys.argv[2])
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}

for case in sys.argv[3:]:
    name, hf_dir, layout, *cast = case.split(":")
    tp, pp = LAYOUTS[layout]
    arch = read_arch(hf_dir)
    lay = init_model_parallel(tp, pp, seed=1)
    model = build.build_gpt(
        arch,
        ModelConfig(hf_path=hf_dir, params_dtype="float32", spec="local", max_seq_len=64),
        ParallelConfig(tp=tp, pp=pp),
    )
    load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=lay.tp_rank, tp=tp, pp_rank=lay.pp_rank, pp=pp)
    dtype = torch.bfloat16 if cast == ["bf16"] else None
    # clone: at TP=1 a yielded tensor may be a view of a parameter, and torch.save would write
    # the whole storage behind it.
    stream = iter_hf_buckets(model, arch, bucket_bytes=bucket_bytes, dtype=dtype)
    buckets = [[(n, t.clone()) for n, t in bucket] for bucket in stream]
    torch.save(buckets, out_dir / f"{name}.rank{dist.get_rank()}.pt")
    dist.barrier()
exit_cleanly(0)
