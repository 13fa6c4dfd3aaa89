"""2-rank worker (TP=1, DP=2): offloading the actor's state is invisible to training, and the
reference built from the actor (optionally parked on host) scores exactly like the actor.

For each (params dtype, distributed optimizer) case, two actors start from the same HF weights.
Both take an optimizer step; one of them then offloads params, grads and optimizer state
(storages must report 0 bytes) and reloads them (bit-exact); both take a second step, after
which every param and optimizer-state tensor must be bit-identical. Writes OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import load_config
from agpo_megatron.models import forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from agpo_megatron.train.offload import ActorMemory, actor_tensors, megatron_optimizers
from agpo_megatron.train.policy import Actor, Reference

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
lay = init_model_parallel(1, 1, seed=1)

g = torch.Generator().manual_seed(lay.dp_rank)
N, S = 4, 16
tokens = torch.randint(0, arch.vocab_size, (N, S), generator=g)
mask = torch.ones(N, S)
mask[:, :3] = 0
mbs = [
    dict(
        tokens=tokens[i::2],
        targets=torch.roll(tokens, -1, 1)[i::2],
        mask=mask[i::2],
        adv=torch.randn(N // 2, generator=g),
    )
    for i in range(2)
]
loss_cfg = PolicyLossConfig(agg_mode="token-mean", kl_coef=0.0)


def loss_fn(logits, mb):
    lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
    return policy_loss(lp, lp.detach() - 0.1, mb["adv"], mb["mask"], loss_cfg, global_num_tokens=2 * mask.sum())


def config(dtype: str, dist_opt: bool, **extra: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"model.hf_path={hf_dir}",
            f"model.params_dtype={dtype}",
            "model.spec=local",
            "model.max_seq_len=64",
            f"parallel.use_distributed_optimizer={str(dist_opt).lower()}",
            "optim.lr=0.01",
            "algo.fused_loss=false",
            "data.train.path=unused.jsonl",
            "data.train.answer_format=raw",
            "data.train.max_prompt_tokens=16",
            "rollout.max_new_tokens=16",
            *(f"{k}={v}" for k, v in extra.items()),
        ],
    )


def state_of(actor: Actor) -> dict[str, torch.Tensor]:
    """Every param, main param and optimizer-state tensor, cloned (keys stable across actors)."""
    out = {f"param/{n}": p.detach().clone() for n, p in actor.model.named_parameters()}
    for i, opt in enumerate(megatron_optimizers(actor.optimizer)):
        for j, group in enumerate(opt.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                out[f"main/{i}.{j}.{k}"] = p.detach().clone()
                for name, v in opt.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        out[f"state/{i}.{j}.{k}.{name}"] = v.detach().clone()
    return out


def equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


results: dict = {}
for dtype, dist_opt in [("float32", True), ("float32", False), ("bfloat16", True)]:
    case = f"{dtype}/{'distopt' if dist_opt else 'plain'}"
    cfg = config(dtype, dist_opt)
    plain = Actor(arch, cfg, lay, total_steps=4)
    moved = Actor(arch, cfg, lay, total_steps=4)
    # Built before the first step, as the trainer does: Adam's moments do not exist yet.
    memory = ActorMemory(
        moved.chunks,
        moved.optimizer,
        config(
            dtype, dist_opt, **{"offload.params": "true", "offload.grads": "true", "offload.optimizer": "true"}
        ).offload,
    )
    for actor in (plain, moved):
        actor.train_step(mbs, loss_fn)
    before = state_of(moved)
    groups = actor_tensors(moved.chunks, moved.optimizer)

    memory.offload_train_state()
    freed_train = {k: sum(t.untyped_storage().nbytes() for t in groups[k]) for k in ("grads", "optimizer")}
    resident_params = sum(t.untyped_storage().nbytes() for t in groups["params"])
    memory.offload_params()
    freed_params = sum(t.untyped_storage().nbytes() for t in groups["params"])
    memory.reload()
    grads_zero = all(not t.any() for t in groups["grads"])
    restored = equal(before, state_of(moved))

    for actor in (plain, moved):
        actor.train_step(mbs, loss_fn)
    after_plain, after_moved = state_of(plain), state_of(moved)
    results[case] = dict(
        freed_train=freed_train,
        resident_params=resident_params,
        freed_params=freed_params,
        stash_bytes={k: s.nbytes for k, s in memory.stashes.items()},
        grads_zero=grads_zero,
        num_state=sum(k.startswith("state/") for k in before),
        restored_mismatch=restored,
        step2_mismatch=equal(after_plain, after_moved),
        moved_by_step2=[k for k in before if k.startswith("param/") and not torch.equal(before[k], after_moved[k])],
    )

    # The reference: copied from the actor's model (no dict of clones), parked on host when asked.
    ref_cfg = config(dtype, dist_opt, **{"offload.reference": "true"})
    ref = Reference(arch, ref_cfg, lay, source=plain.model)
    ref_bytes_parked = sum(p.untyped_storage().nbytes() for p in ref.model.parameters())
    with ref.memory.resident():  # NOTE: reading a freed storage is undefined (a segfault on CPU)
        same_weights = all(torch.equal(p, q) for p, q in zip(ref.model.parameters(), plain.model.parameters()))
    lp_ref = [o["logprobs"] for o in ref.logprobs(mbs, temperature=1.0)]
    ref_bytes_after = sum(p.untyped_storage().nbytes() for p in ref.model.parameters())
    lp_resident = [o["logprobs"] for o in Reference(arch, cfg, lay, source=plain.model).logprobs(mbs, temperature=1.0)]
    lp_actor = [o["logprobs"] for o in plain.logprobs(mbs, temperature=1.0)]
    results[case].update(
        ref_bytes_parked=ref_bytes_parked,
        ref_bytes_after=ref_bytes_after,
        ref_same_weights=same_weights,
        ref_lp_equal_resident=all(torch.equal(a, b) for a, b in zip(lp_ref, lp_resident)),
        ref_lp_equal_actor=all(torch.equal(a, b) for a, b in zip(lp_ref, lp_actor)),
        ref_lp_finite=all(bool(torch.isfinite(a).all()) for a in lp_ref),
    )
    dist.barrier()

torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
exit_cleanly(0)
