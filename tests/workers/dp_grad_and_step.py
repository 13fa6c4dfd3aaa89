"""2-rank worker (TP=1, DP=2): the policy-loss gradient at DP=2 equals DP=1 on the same global batch,
and Megatron DDP + the distributed optimizer decrease the loss on a fixed batch.

DP=1 is computed in-process on a plain (un-wrapped) GPTModel over the whole global batch; DP=2 runs
the real path: half the batch per rank, two micro-batches each, Megatron's schedule, DDP grad
all-reduce. Results go to OUT_DIR/dp_grad.pt and OUT_DIR/opt_losses.pt from rank 0.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.cpu_platform import megatron_scope
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
model_cfg = ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=64)
par = ParallelConfig(tp=1, pp=1, use_distributed_optimizer=True)
loss_cfg = PolicyLossConfig(agg_mode="token-mean", kl_coef=0.0)

# A global batch of 8 sequences with ragged response masks and per-sequence advantages.
g = torch.Generator().manual_seed(0)
N, S = 8, 20
tokens = torch.randint(0, arch.vocab_size, (N, S), generator=g)
lengths = torch.randint(4, S - 1, (N,), generator=g)
mask = (torch.arange(S)[None] < lengths[:, None]).float()
mask[:, :3] = 0  # "prompt" positions
adv = torch.randn(N, generator=g)
global_tokens = mask.sum()
batch = dict(tokens=tokens, targets=torch.roll(tokens, -1, 1), mask=mask, adv=adv)


def loss_fn(logits, mb):
    lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
    # On-policy (ratio = 1) for the gradient check; fixed rollout-time log-probs for the steps,
    # so that the clipped surrogate's value moves as the policy does.
    old = mb["old"] if "old" in mb else lp.detach()
    return policy_loss(lp, old, mb["adv"], mb["mask"], loss_cfg, global_num_tokens=global_tokens)


lay = init_model_parallel(1, 1, seed=1)
reader = HFCheckpointReader(hf_dir)

# DP=1 reference: the whole batch, one plain backward.
ref = build.build_gpt(arch, model_cfg, par)
load_hf_weights(ref, arch, reader, tp_rank=0, tp=1, pp_rank=0, pp=1)
with megatron_scope():
    logits = ref(tokens, torch.arange(S)[None].expand(N, -1), forward.causal_mask(S, torch.device("cpu")))
loss, _ = loss_fn(logits, batch)
loss.backward()
ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}


# DP=2: this rank's half, split into two micro-batches. Grads are compared with the plain
# all-reduce DDP: the distributed optimizer reduce-scatters, leaving each rank only its shard.
def trainable(distributed_optimizer: bool):
    model = build.build_gpt(arch, model_cfg, par)
    load_hf_weights(model, arch, reader, tp_rank=0, tp=1, pp_rank=0, pp=1)
    p = ParallelConfig(tp=1, pp=1, use_distributed_optimizer=distributed_optimizer)
    return (model, *build.wrap_for_training(model, OptimConfig(lr=3e-3, clip_grad=1.0), p, total_steps=10))


model, ddp, opt, sched = trainable(False)
half = slice(lay.dp_rank * N // 2, (lay.dp_rank + 1) * N // 2)
mine = {k: v[half] for k, v in batch.items()}
mbs = [{k: v[i::2] for k, v in mine.items()} for i in range(2)]
ddp.zero_grad_buffer()
forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
dp_grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
if lay.rank == 0:
    torch.save({"ref": ref_grads, "dp": dp_grads, "ref_loss": loss.detach()}, out_dir / "dp_grad.pt")

# Optimizer steps with the distributed optimizer on the fixed batch: the global loss must go down.
model, ddp, opt, sched = trainable(True)
for mb, out in zip(mbs, forward.compute_logprobs([ddp], mbs)):
    mb["old"] = out["logprobs"]
losses = []
for _ in range(6):
    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
    local = sum(float(o["pg_loss"]) * float(o["num_tokens"]) for o in out)
    total = torch.tensor([local])
    dist.all_reduce(total)
    losses.append(total.item() / global_tokens.item())
    with megatron_scope():
        ok, grad_norm, _ = opt.step()
    assert ok, "optimizer step skipped"
    sched.step(1)
if lay.rank == 0:
    torch.save({"losses": losses}, out_dir / "opt_losses.pt")
exit_cleanly(0)
