"""2-rank worker at EP=2: routing replay (models/routing.py) on a tiny Qwen3-MoE (4 experts, top-2).

- record: the old-log-prob forward stores every token's top-2 per layer in its micro-batch;
  replaying that record gives the same log-probs bit for bit, and `compare` counts no mismatch;
- a forced record (layer 0: experts {2, 3} for every token, layer 1: {0, 1}; not what the router
  would choose) is replayed in a training step: the routers hand the dispatcher exactly those
  experts, and only those experts' weights get gradient (rank 0 holds experts 0-1, rank 1 2-3);
- `compare` against the forced record counts the tokens the free routing sends elsewhere.

Then the same 2 ranks at PP=2 (each stage holds one MoE layer and records/replays only its own),
through the real `Actor` with the fused loss and packed micro-batches (local spec: block-diagonal
rows), with per-sequence records that travel through packing as r3's vLLM records do:
- r2: the old-log-prob forward records `{own layer: [R, S, 2]}`; replaying it changes nothing;
- r3 (a synthetic record in place of vLLM's, per sequence and layer a different expert pair): the
  log-prob forward routes every recorded token exactly so;
- an r3 update whose record sends every token to {2, 3} in layer 0 and {0, 1} in layer 1: only those
  experts get gradient, and the reported mismatch is the free routing's difference from it.
Writes rank{r}.pt (phase 2's results under "pp2").
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


# ---- phase 2: PP=2, packed micro-batches, the fused loss, through the Actor ----
import dataclasses  # noqa: E402

from agpo_megatron.algo.loss import PolicyLossConfig  # noqa: E402
from agpo_megatron.config.algo import AlgoConfig  # noqa: E402
from agpo_megatron.models.routing import _to_router  # noqa: E402
from agpo_megatron.train.batch import split_micro_batches  # noqa: E402
from agpo_megatron.train.policy import Actor  # noqa: E402
from agpo_megatron.train.sequences import Sequences  # noqa: E402
from tests.workers.actor_config import actor_config  # noqa: E402

cfg = actor_config(hf_dir, algo=AlgoConfig(fused_loss=True, loss_chunk_tokens=16, routing_replay="r2"))
cfg = dataclasses.replace(
    cfg,
    parallel=ParallelConfig(pp=2, use_distributed_optimizer=False),
    model=dataclasses.replace(cfg.model, moe_aux_loss_coef=0.0),
)
lay = init_model_parallel(1, 2, seed=1)
actor = Actor(arch, cfg, lay, total_steps=2)
assert actor.chunk_tokens == 16 and actor.routing is not None
stage_layer = lay.pp_rank  # 2 layers over 2 stages: stage r holds layer r
g = torch.Generator().manual_seed(7)  # the same data on both stages
lens = [11, 7, 5, 9, 6, 4]
tokens = [torch.randint(1, arch.vocab_size, (n,), generator=g).tolist() for n in lens]


def pair_record(i: int, n: int) -> torch.Tensor:  # [n, L=2, K=2]: sequence i, layer l -> {i+l, i+l+2} mod 4
    return torch.tensor([[(i + l) % 4, (i + l + 2) % 4] for l in range(2)]).expand(n, 2, 2).clone()


seqs = Sequences(
    tokens=tokens,
    prompt_lens=[3] * len(lens),
    advantages=torch.linspace(-1, 1, len(lens)),
    routed_experts=[pair_record(i, n - 1) for i, n in enumerate(lens)],  # as vLLM: all but the last token
)


def packed_mbs(with_record: bool):
    mbs = split_micro_batches(
        seqs if with_record else dataclasses.replace(seqs, routed_experts=None),
        micro_batch_size=2,
        max_tokens=32,
        pad_id=0,
        uniform_length=True,  # PP: one shape
        packing=True,
    )
    assert all("seq_ids" in mb for mb in mbs) and len(mbs) >= 2
    return mbs


pp2 = {}
# r2: record (fused log-prob path), then replay the natural record
mbs = packed_mbs(with_record=False)
free = actor.logprobs(mbs, temperature=1.0)
pp2["record_layers"] = sorted({layer for mb in mbs for layer in mb["routed_experts"]})
pp2["record_shape_ok"] = all(mb["routed_experts"][stage_layer].shape == (*mb["tokens"].shape, 2) for mb in mbs)
with actor.routing.using("replay"):
    replayed = forward.compute_logprobs(actor.chunks, mbs, chunk_tokens=16)
pp2["replay_same_logprobs"] = all(torch.equal(a["logprobs"], b["logprobs"]) for a, b in zip(free, replayed))
pp2["natural_mismatch"] = actor.routing.pop_mismatch(count_here=True)

# r3: the synthetic per-sequence record, carried through packing, drives the log-prob forward
actor.routing_replay = "r3"  # what a validated r3 config gives (refused on CPU: vLLM cannot record here)
mbs = packed_mbs(with_record=True)
maps = []
hooks = [
    m.register_forward_hook(lambda mod, args, out: maps.append(out[1].detach().clone()))
    for m in actor.model.modules()
    if type(m).__name__ == "TopKRouter"
]
actor.logprobs(mbs, temperature=1.0)
ok = True
for mb, routing_map in zip(mbs, maps):  # [T, E] in the router's order (local spec: [S * R])
    # What the record says, worked out from the sequences, not from the packed record: token (r, t)
    # is token position_ids[r, t] of sequence seq_index[seq_ids[r, t]]; all but its last are recorded.
    seq = mb["seq_index"][mb["seq_ids"].clamp(min=0)]  # [R, S]
    recorded = (mb["seq_ids"] >= 0) & (mb["position_ids"] < torch.tensor(lens)[seq] - 1)
    pair = torch.stack([(seq + stage_layer) % 4, (seq + stage_layer + 2) % 4], dim=-1)  # [R, S, 2]
    rec, recorded = _to_router(pair, thd=False), _to_router(recorded, thd=False)  # [T, 2], [T]
    want = torch.zeros_like(routing_map)
    want[recorded] = want[recorded].scatter(1, rec[recorded].long(), True)
    ok &= bool(torch.equal(routing_map[recorded], want[recorded]))
    ok &= bool((routing_map.sum(-1) == 2).all())
pp2["r3_routed_as_recorded"] = ok and len(maps) == len(mbs)
pp2["r3_recorded_tokens"] = sum(int((mb["routed_experts"][stage_layer] >= 0).all(-1).sum()) for mb in mbs)
pp2["r3_mismatch_reset"] = all(h.counted == 0 for h in actor.routing.hooks.values())  # popped by the pass
pp2["r3_logprob_pass_mismatch"] = list(actor._rollout_mismatch)  # the synthetic record vs free routing
for h in hooks:
    h.remove()

# r3 update, a record that sends every token to {2, 3} (layer 0) / {0, 1} (layer 1)
forced = {0: torch.tensor([2, 3], dtype=torch.int32), 1: torch.tensor([0, 1], dtype=torch.int32)}
for mb in mbs:
    mb["routed_experts"] = {layer: e.expand(*mb["tokens"].shape, 2).clone() for layer, e in forced.items()}
outs = actor.logprobs(mbs, temperature=1.0)  # old = new: ratio 1, no token is clipped
for i, mb in enumerate(mbs):
    mb["old_logprobs"] = outs[i]["logprobs"] if outs else torch.zeros(mb["tokens"].shape)  # first stage: unused
metrics = actor.policy_step(
    mbs,
    PolicyLossConfig(),
    temperature=1.0,
    global_num_tokens=sum(int(mb["loss_mask"].sum()) for mb in mbs),
    global_num_seqs=len(lens),
    kl_coef=0.0,
    eps=(0.2, 0.2),
)
pp2["update_mismatch"] = metrics["moe_routing_mismatch"]
pp2["rollout_mismatch"] = metrics["moe_rollout_routing_mismatch"]  # mean of the two log-prob passes
pp2["rollout_mismatch_passes"] = list(actor._rollout_mismatch)  # kept: every update of the rollout reports it
actor.logprobs(mbs, temperature=1.0)  # the next rollout's first log-prob pass starts afresh
pp2["rollout_mismatch_restarted"] = len(actor._rollout_mismatch) == 1
pp2["grad_abs"] = {
    n: float(p.main_grad.abs().sum()) for n, p in actor.model.named_parameters() if ".local_experts." in n
}
with actor.routing.using("compare"):
    forward.compute_logprobs(actor.chunks, mbs, chunk_tokens=16)
pp2["compare_mismatch"] = actor.routing.pop_mismatch(count_here=True)
res["pp2"] = pp2
torch.save(res, out_dir / f"rank{dist.get_rank()}.pt")
exit_cleanly(0)
