"""2-rank worker at EP=2 (each rank holds half the experts): a converted Qwen3-MoE checkpoint,
the bucketed HF export, a trained re-export, and a resume with the expert shards' optimizer state.

argv: OUT_DIR HF_DIR CKPT_DIR (CKPT_DIR converted from HF_DIR by hf_to_megatron in one process).
  - load CKPT_DIR at EP=2, log-probs                                  -> OUT_DIR/ep2_logprobs.pt
  - export it through `iter_hf_buckets` (the vLLM sync's stream)    -> OUT_DIR/ep2_export.pt
  - train 2 steps at EP=2 (distributed optimizer over DP=2 and expert-DP=1), save with optimizer,
    take a 3rd step; a fresh model + optimizer loaded from the save takes the same 3rd step bit
    for bit                                                          -> OUT_DIR/resume.pt
  - the saved (trained) checkpoint exported to HF by rank 0 (megatron_to_hf, one process reads
    any layout), next to the trained model's own export and log-probs -> OUT_DIR/trained*.pt, trained_hf/
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.export import iter_hf_buckets
from agpo_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.cpu_platform import megatron_scope
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from checkpoints_conversion.megatron_to_hf import convert_megatron_to_hf

out, hf_dir, ckpt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
arch = read_arch(hf_dir)
MODEL_CFG = ModelConfig(params_dtype="float32", spec="local", max_seq_len=64)
PAR = ParallelConfig(ep=2, use_distributed_optimizer=True)
toks = torch.randint(0, arch.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
mbs = [{"tokens": t, "targets": torch.roll(t, -1, dims=1)} for t in toks.split(2)]
lay = init_model_parallel(1, 1, seed=1, ep=2)
assert lay.ep == 2 and lay.dp == 2


def logprobs(model):
    res = forward.compute_logprobs(model, mbs, temperature=1.0)
    return torch.cat([r["logprobs"] for r in res])


def export(model):
    return {n: t.clone() for bucket in iter_hf_buckets(model, arch, bucket_bytes=40_000) for n, t in bucket}


def save_on_rank0(obj, name):
    if dist.get_rank() == 0:
        torch.save(obj, out / name)
    dist.barrier()


model = build.build_gpt(arch, MODEL_CFG, PAR)
load_checkpoint(ckpt, [model])
save_on_rank0(logprobs(model), "ep2_logprobs.pt")
exported = export(model)
save_on_rank0(exported, "ep2_export.pt")
# Rank 1 exported too (every rank gets every tensor): both must agree.
mine = torch.stack([t.double().sum() for t in exported.values()])
theirs = mine.clone()
dist.broadcast(theirs, src=0)
assert torch.equal(mine, theirs), "ranks exported different tensors"

# ---- training, save, resume ----
optim = OptimConfig(lr=1e-2, warmup_steps=2, decay_style="cosine")
mine_mb = [mbs[lay.dp_rank]]  # this DP rank's half


def trainable():
    m = build.build_gpt(arch, MODEL_CFG, PAR)
    load_checkpoint(ckpt, [m])  # weights only, before the optimizer exists
    return build.wrap_for_training(m, optim, PAR, total_steps=10)


def loss_fn(logits, mb):
    lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
    return -lp.sum() / (4 * 24), {}  # normalised by the global token count


def train_step(ddp, opt, sched):
    ddp.train()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward.forward_backward([ddp], mine_mb, loss_fn, forward_only=False)
    with megatron_scope():
        ok, _, _ = opt.step()
    assert ok, "optimizer step skipped"
    sched.step(1)


ddp, opt, sched = trainable()
initial = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
for _ in range(2):
    train_step(ddp, opt, sched)
saved = out / "trained_ckpt"
save_checkpoint(saved, [ddp], opt, sched, step=2, hf_dir=hf_dir)
ddp.module.eval()
save_on_rank0(export(ddp.module), "trained_export.pt")
save_on_rank0(logprobs(ddp.module), "trained_logprobs.pt")
train_step(ddp, opt, sched)
continued = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

ddp2, opt2, sched2 = trainable()
load_checkpoint(saved, [ddp2], opt2, sched2)
train_step(ddp2, opt2, sched2)
resumed = dict(ddp2.module.named_parameters())
everyone = [None] * dist.get_world_size()
dist.all_gather_object(
    everyone,
    {
        "unequal": [n for n, p in continued.items() if not torch.equal(p, resumed[n])],
        "experts_trained": [
            n for n in continued if ".local_experts." in n and not torch.equal(continued[n], initial[n])
        ],
        "experts": [n for n in continued if ".local_experts." in n],
    },
)
save_on_rank0(everyone, "resume.pt")

init_model_parallel(1, 1, seed=1)
if dist.get_rank() == 0:
    convert_megatron_to_hf(saved, out / "trained_hf")
dist.barrier()
exit_cleanly(0)
