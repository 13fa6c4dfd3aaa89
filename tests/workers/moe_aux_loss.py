"""2-rank worker (DP=2): the router's load-balancing gradient is the same whatever the micro-batch
split and the tokens per rank, and the logged aux loss of a uniform router is 1.

The switch loss is invariant to duplicating the batch, so with the policy loss at zero the router's
gradient must not change when rank data is X, [X], [X] (two micro-batches) or [X; X] (one of twice
the rows), nor when the ranks hold different amounts (rank 0 X, rank 1 [X; X]). Writes
grads_{case}.pt (rank 0) and aux_{case}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward, moe
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
lay = init_model_parallel(1, 1, seed=1)
model = build.build_gpt(
    arch, ModelConfig(params_dtype="float32", spec="local", max_seq_len=64, moe_aux_loss_coef=0.1), ParallelConfig()
)
load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1)
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.endswith("router.weight"):
            p.zero_()  # uniform routing: the switch loss is exactly 1
ddp, _, _ = build.wrap_for_training(model, OptimConfig(), ParallelConfig(use_distributed_optimizer=False), 1)

g = torch.Generator().manual_seed(0)
x = torch.randint(0, arch.vocab_size, (2, 16), generator=g)


def mb(t):
    return {"tokens": t, "targets": torch.roll(t, -1, dims=1)}


def zero_loss(logits, mb):
    return 0.0 * logits.float().sum(), {}


captured = {}
model.decoder.layers[1].mlp.router.register_forward_pre_hook(lambda mod, args: captured.update(h=args[0].detach()))


def switch_loss_grad(h, weight, k, coef):  # h [S, B, H]: layer 1's router input; weight [E, H]
    """coef * d(switch loss)/d(router weight) by hand: E/(T^2 k) * sum_e tokens_e * sum_x p(x, e)."""
    w = weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(h.reshape(-1, h.shape[-1]) @ w.t(), dim=-1)  # [T, E]
    tokens = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0).sum(0)  # [E]
    t, e = probs.shape
    (coef * e / (t * t * k) * (tokens * probs.sum(0)).sum()).backward()
    return w.grad


rank = dist.get_rank()
cases = {
    "one": [mb(x)],
    "two_micro_batches": [mb(x), mb(x)],
    "doubled_rows": [mb(torch.cat([x, x]))],
    "uneven_ranks": [mb(x)] if rank == 0 else [mb(torch.cat([x, x]))],
}
for name, mbs in cases.items():
    ddp.train()
    ddp.zero_grad_buffer()
    forward.forward_backward([ddp], mbs, zero_loss, forward_only=False)
    aux = moe.pop_aux_loss(arch.num_layers, len(mbs))
    if rank == 0:
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters() if n.endswith("router.weight")}
        if name == "one":  # every rank holds X: the mean over ranks is X's own loss
            grads["by_hand"] = switch_loss_grad(captured["h"], model.decoder.layers[1].mlp.router.weight, 2, 0.1)
        torch.save(grads, out_dir / f"grads_{name}.pt")
        torch.save(torch.tensor(aux), out_dir / f"aux_{name}.pt")
exit_cleanly(0)
