"""2-rank worker: per-token log-probs of one tiny Qwen3-MoE checkpoint at EP=1 (the two ranks are
data-parallel replicas) and at EP=2 (each rank holds half the experts), through Megatron's MoE layer
with the CPU token dispatcher, and one backward at EP=2 (the all-gather dispatcher's backward on gloo).

Writes ep1.pt / ep2.pt (rank 0) and grad_ep2_rank{r}.pt into OUT_DIR for the test to compare.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime import cpu_platform
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
model_cfg = ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=64)
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, arch.vocab_size, (4, 24), generator=g)
mbs = [{"tokens": t, "targets": torch.roll(t, -1, dims=1)} for t in tokens.split(2)]

for name, ep in [("ep1", 1), ("ep2", 2)]:
    lay = init_model_parallel(1, 1, seed=1, ep=ep)
    assert (lay.ep, lay.ep_rank) == (ep, dist.get_rank() if ep == 2 else 0), lay
    model = build.build_gpt(arch, model_cfg, ParallelConfig(ep=ep))
    n_local = sum(1 for n, _ in model.named_parameters() if n.startswith("decoder.layers.0.mlp.experts."))
    assert n_local == 2 * arch.num_experts // ep, n_local  # fc1 + fc2 per local expert
    load_hf_weights(
        model, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1, ep_rank=lay.ep_rank, ep=ep
    )
    res = forward.compute_logprobs(model, mbs, temperature=0.7, with_entropy=True)
    if dist.get_rank() == 0:
        torch.save({k: torch.cat([r[k] for r in res]) for k in ("logprobs", "entropy")}, out_dir / f"{name}.pt")
    if ep == 2:
        # One backward through the dispatcher: sum of log-probs of rank 0's micro-batch.
        model.train()
        mb = mbs[0]
        with cpu_platform.megatron_scope():
            logits = forward.run_model(model, mb)
        lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
        lp.sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, out_dir / f"grad_ep2_rank{dist.get_rank()}.pt")
    dist.barrier()
exit_cleanly(0)
