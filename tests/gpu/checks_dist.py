"""Smoke sections: the NCCL world of one, Megatron's groups, and the D1 collective pattern.

D1 (issue 8): every tensor handed to a collective must live on its group's communication device,
`parallel.comm_device(group)`. On one GPU the world is NCCL-only, so a CPU tensor in a collective
raises; `policy_step` below is the trainer's own step, run under a recorder of the collectives'
tensor devices so the line also says how many collectives it saw and whether any was off-device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from tests.gpu.common import Ctx, check, judge, require_attrs, require_params, tiny_arch, tiny_cfg

# torch.distributed entry points that take tensors (the object collectives end in `broadcast` etc.).
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "_all_gather_base",
    "_reduce_scatter_base",
)


def prepare(ctx: Ctx) -> None:
    """Imports and API presence of everything this module calls (the dry-run runs only this)."""
    import torch.distributed as dist
    from megatron.core import parallel_state  # noqa: F401

    from agpo_megatron.algo.loss import PolicyLossConfig
    from agpo_megatron.runtime import parallel
    from agpo_megatron.train import policy

    require_attrs(
        parallel,
        "comm_device",
        "init_distributed",
        "init_model_parallel",
        "current_layout",
        why="D1: one helper names the communication device",
    )
    require_params(parallel.comm_device, "group")
    require_attrs(policy, "Actor", "reduce_token_weighted")
    require_attrs(policy.Actor, "policy_step", "logprobs", "train_step")
    require_params(
        policy.Actor.policy_step,
        "micro_batches",
        "loss_cfg",
        "temperature",
        "global_num_tokens",
        "global_num_seqs",
        "kl_coef",
        "eps",
    )
    require_attrs(dist, *(c for c in _COLLECTIVES if not c.startswith("_")))
    PolicyLossConfig()
    tiny_cfg(ctx)
    tiny_arch()


class CollectiveRecorder:
    """Wraps torch.distributed's tensor collectives; records each tensor's device vs comm_device(group)."""

    def __init__(self):
        self.calls = 0
        self.off_device: list[str] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[CollectiveRecorder]:
        import torch
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        from agpo_megatron.runtime.parallel import comm_device

        def wrap(name, fn):
            def recorded(*args, **kwargs):
                values = list(args) + list(kwargs.values())
                group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                tensors = [a for a in values if isinstance(a, torch.Tensor)]
                tensors += [t for a in values if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                want = comm_device(group)
                self.calls += 1
                for t in tensors:
                    if t.device != want:
                        self.off_device.append(f"{name}:{t.device}!={want}")
                return fn(*args, **kwargs)

            return recorded

        saved = []
        for mod in (dist, c10d):
            for name in _COLLECTIVES:
                fn = getattr(mod, name, None)
                if fn is not None:
                    saved.append((mod, name, fn))
                    setattr(mod, name, wrap(name, fn))
        try:
            yield self
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)


def run_nccl_world(ctx: Ctx) -> None:
    prepare(ctx)
    import torch
    import torch.distributed as dist

    from agpo_megatron.runtime import parallel

    with check(ctx, "nccl_world"):
        parallel.init_distributed(timeout_s=120)
        dev = parallel.comm_device()
        x = torch.full((4,), 2.0, device=dev)
        dist.all_reduce(x)
        objs = [{"probe": 1}]
        dist.broadcast_object_list(objs, src=0)
        backend = dist.get_backend()
        want_backend, want_dev = ("nccl", "cuda") if ctx.gpu else ("gloo", "cpu")
        status, why = judge(
            backend=backend == want_backend,
            comm_device=dev.type == want_dev,
            world_of_one=dist.get_world_size() == 1,
            all_reduce=x.sum().item() == 8.0,
            broadcast_object=objs == [{"probe": 1}],
        )
        extra = {}
        if ctx.gpu:
            v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old ones
            extra = dict(
                current_device=torch.cuda.current_device(),
                nccl=".".join(map(str, v)) if isinstance(v, tuple) else str(v),
            )
        ctx.report(
            "nccl_world", status, **why, backend=backend, comm_device=str(dev), world=dist.get_world_size(), **extra
        )


def run_megatron_groups(ctx: Ctx) -> None:
    prepare(ctx)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from agpo_megatron.runtime import parallel

    with check(ctx, "megatron_groups"):
        lay = parallel.init_model_parallel(1, 1, seed=1234)
        groups = {
            "tp": mpu.get_tensor_model_parallel_group(),
            "pp": mpu.get_pipeline_model_parallel_group(),
            "dp": mpu.get_data_parallel_group(),
            "mp": mpu.get_model_parallel_group(),
        }
        sums, backends = {}, {}
        for name, group in groups.items():
            y = torch.ones(3, device=parallel.comm_device(group))
            dist.all_reduce(y, group=group)
            sums[name] = y.sum().item()
            backends[name] = str(dist.get_backend(group))
        status, why = judge(
            layout=(lay.tp, lay.pp, lay.dp, lay.world_size) == (1, 1, 1, 1),
            all_reduce_per_group=all(v == 3.0 for v in sums.values()),
            backends=all(b == ("nccl" if ctx.gpu else "gloo") for b in backends.values()),
        )
        ctx.report(
            "megatron_groups",
            status,
            **why,
            tp=lay.tp,
            pp=lay.pp,
            dp=lay.dp,
            backends=",".join(f"{k}:{v}" for k, v in backends.items()),
        )


def run_d1_reduce_token_weighted(ctx: Ctx) -> None:
    """The exact collective of D1 (policy.reduce_token_weighted), with a hand-worked answer."""
    prepare(ctx)
    import torch

    from agpo_megatron.runtime import parallel
    from agpo_megatron.train.policy import reduce_token_weighted

    with check(ctx, "d1_reduce_token_weighted"):
        lay = parallel.init_model_parallel(1, 1, seed=1234)
        per_mb = [
            {"num_tokens": 4.0, "pg_loss": torch.tensor(0.5, device=ctx.device)},
            {"num_tokens": 2.0, "pg_loss": 2.0},
        ]
        with CollectiveRecorder().active() as rec:
            out = reduce_token_weighted(per_mb, lay)
        # (4 * 0.5 + 2 * 2.0) / 6 = 1.0
        status, why = judge(
            keys=set(out) == {"pg_loss"},
            value=abs(out.get("pg_loss", 0.0) - 1.0) < 1e-12,
            on_comm_device=not rec.off_device,
        )
        ctx.report(
            "d1_reduce_token_weighted",
            status,
            **why,
            pg_loss=out.get("pg_loss"),
            want=1.0,
            collectives=rec.calls,
            off_device=",".join(rec.off_device[:4]) or "none",
        )


def run_policy_step(ctx: Ctx) -> None:
    """One real `Actor.policy_step` (fused loss, DDP, distributed optimizer) on a tiny model."""
    prepare(ctx)
    from agpo_megatron.runtime import parallel
    from agpo_megatron.train.policy import Actor
    from tests.gpu.common import micro_batches, policy_step, tiny_sequences

    with check(ctx, "policy_step"):
        lay = parallel.init_model_parallel(1, 1, seed=1234)
        arch, cfg = tiny_arch(ctx.dtype_name), tiny_cfg(ctx)
        actor = Actor(arch, cfg, lay, total_steps=10)
        seqs = tiny_sequences(arch.vocab_size)
        mbs = micro_batches(seqs)
        for mb, out in zip(mbs, actor.logprobs(mbs, temperature=1.0), strict=True):
            mb["old_logprobs"] = out["logprobs"]
        before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
        with CollectiveRecorder().active() as rec:
            m = policy_step(actor, mbs, seqs)
        changed = sum(int(not p.detach().equal(before[n])) for n, p in actor.model.named_parameters())
        finite = all(math.isfinite(v) for v in m.values())
        status, why = judge(
            metrics_finite=finite and "pg_loss" in m,
            grad_norm_positive=m["grad_norm"] > 0,
            update_applied=m["update_skipped"] == 0.0,
            all_params_changed=changed == len(before),
            on_comm_device=not rec.off_device,
            collectives_seen=rec.calls > 0,
        )
        ctx.report(
            "policy_step",
            status,
            **why,
            pg_loss=m.get("pg_loss"),
            grad_norm=m.get("grad_norm"),
            params_changed=f"{changed}/{len(before)}",
            collectives=rec.calls,
            off_device=",".join(rec.off_device[:4]) or "none",
            device=str(next(actor.model.parameters()).device),
        )
