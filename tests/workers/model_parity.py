"""2-rank worker: per-token log-probs and entropy of one HF checkpoint at TP=1, TP=2 and PP=2,
and at TP=1 with Megatron's own core attention instead of SDPA.

Writes {layout}.pt (from the last pipeline stage, rank-0-of-TP) into OUT_DIR for the test to compare.
"""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
model_cfg = ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=64)
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, arch.vocab_size, (4, 24), generator=g)
mbs = [{"tokens": t, "targets": torch.roll(t, -1, dims=1)} for t in tokens.split(2)]

# tp1_megatron_attention: Megatron's unfused core attention instead of SDPA (model.local_attention).
megatron_attention = dataclasses.replace(model_cfg, local_attention="megatron")
for name, tp, pp in [("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2), ("tp1_megatron_attention", 1, 1)]:
    lay = init_model_parallel(tp, pp, seed=1)
    cfg = megatron_attention if name.endswith("megatron_attention") else model_cfg
    model = build.build_gpt(arch, cfg, ParallelConfig(tp=tp, pp=pp))
    load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=lay.tp_rank, tp=tp, pp_rank=lay.pp_rank, pp=pp)
    res = forward.compute_logprobs(model, mbs, temperature=0.7, with_entropy=True)
    if lay.is_last_stage and lay.tp_rank == 0 and lay.dp_rank == 0:
        torch.save({k: torch.cat([r[k] for r in res]) for k in ("logprobs", "entropy")}, out_dir / f"{name}.pt")
    dist.barrier()
exit_cleanly(0)
