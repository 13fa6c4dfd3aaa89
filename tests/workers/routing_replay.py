"""2-rank worker at EP=2: routing replay (models/routing.py) on a tiny Qwen3-MoE (4 experts, top-2).

- record: the old-log-prob forward stores every token's top-2 per layer in its micro-batch;
  replaying that record gives the same log-probs bit for bit, and `compare` counts no mismatch;
- a forced record (layer 0: experts {2, 3} for every token, layer 1: {0, 1}; not what the router
  would choose) is replayed in a training step: the routers hand the dispatcher exactly those
  experts, and only those experts' weights get gradient (rank 0 holds experts 0-1, rank 1 2-3);
- `compare` against the forced record counts the tokens the free routing sends elsewhere.
Writes rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.models.routing import RoutingControl
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
par = ParallelConfig(ep=2, use_distributed_optimizer=False)
lay = init_model_parallel(1, 1, seed=1, ep=2)
model = build.build_gpt(
    arch, ModelConfig(params_dtype="float32", spec="local", max_seq_len=64, moe_aux_loss_coef=0.0), par
)
load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1, ep_rank=lay.ep_rank, ep=2)
control = RoutingControl.install(model)
model.agpo_routing = control
ddp, _, _ = build.wrap_for_training(model, OptimConfig(), par, 1)

g = torch.Generator().manual_seed(lay.rank)
toks = torch.randint(0, arch.vocab_size, (4, 12), generator=g)
mbs = [{"tokens": t, "targets": torch.roll(t, -1, 1), "loss_mask": torch.ones(2, 12)} for t in toks.split(2)]

# What each router hands the dispatcher: its routing map [T, E].
seen = {}
for module in model.modules():
    if type(module).__name__ == "TopKRouter":
        module.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.layer_number - 1, out[1].detach()))

res = {}
with control.using("record"):
    free = forward.compute_logprobs([ddp], mbs)
res["record_shapes"] = {layer: tuple(r.shape) for layer, r in mbs[0]["routed_experts"].items()}
with control.using("replay"):
    replayed = forward.compute_logprobs([ddp], mbs)
res["replay_same_logprobs"] = all(torch.equal(a["logprobs"], b["logprobs"]) for a, b in zip(free, replayed))
res["natural_mismatch"] = control.pop_mismatch(count_here=True)

forced = {0: torch.tensor([2, 3]), 1: torch.tensor([0, 1])}
for mb in mbs:
    mb["natural"] = mb["routed_experts"]
    mb["routed_experts"] = {layer: e.expand(2, 12, 2).clone() for layer, e in forced.items()}


def loss_fn(logits, mb):
    lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
    return -lp.sum() / (2 * 4 * 12), {}


ddp.train()
ddp.zero_grad_buffer()
maps = []
with control.using("replay"):
    forward.forward_backward([ddp], mbs[:1], loss_fn, forward_only=False)
maps = {layer: m.clone() for layer, m in seen.items()}
res["replay_mismatch"] = control.pop_mismatch(count_here=True)
# The routing map the dispatcher got: exactly the forced pair for each of the 24 tokens.
res["routed_as_recorded"] = {
    layer: bool((m.sum(-1) == 2).all() and m[:, forced[layer]].all()) for layer, m in maps.items()
}
res["grad_abs"] = {n: float(p.main_grad.abs().sum()) for n, p in model.named_parameters() if ".local_experts." in n}
with control.using("compare"):
    forward.compute_logprobs([ddp], mbs)
res["compare_mismatch"] = control.pop_mismatch(count_here=True)
res["natural_vs_forced"] = sum(
    int((mb["natural"][layer].sort(-1).values != forced[layer]).any(-1).sum()) for mb in mbs for layer in forced
) / (2 * 2 * 12 * 2)
torch.save(res, out_dir / f"rank{dist.get_rank()}.pt")
exit_cleanly(0)
