"""Smoke sections of issue 18 (the GPU path, round 2): what only a GPU can confirm of its CPU-tested fixes.

- save_peak_memory: a checkpoint save in the train phase (vLLM asleep; here a stand-in engine that
  holds `--save-kv-mib` of CUDA memory while awake) against the old order (the offloaded actor
  reloaded, grads included, with the engine awake). Peak CUDA memory of each; the new one must be lower.
- pinned_bytes: a `HostStash` of awkward sizes offloaded to pinned host memory; the caching host
  allocator's reserved bytes must stay within 5% of the bytes stashed (one pinned buffer per
  storage is rounded up to a power of two: the same sizes through `torch.empty(pin_memory=True)`
  are reported next to it).
- finite_check_syncs: `step_is_finite` / `check_finite_weights` over 200 CUDA tensors make one
  synchronizing call each (`torch.cuda.set_sync_debug_mode`), and still catch NaN and Inf in bf16.
- local_device_binding: LOCAL_RANK=3 with one visible device binds device 0 (`--gpus-per-task=1`).

In the cpu-logic mode the same code runs on CPU: the order, the slab plan and the sync count (through
the patched conversion helper) are checked; memory figures are not (nothing is pinned or freed on CPU).
"""

from __future__ import annotations

import os

from tests.gpu.common import Ctx, Skip, check, gib, judge, require_attrs, require_params, tiny_arch, tiny_cfg


def prepare(ctx: Ctx) -> dict:
    from agpo_megatron.checkpoint import train_state
    from agpo_megatron.runtime import nonfinite, parallel, pinned
    from agpo_megatron.train import colocate, offload

    require_attrs(colocate.Colocation, "to_train", "to_rollout", "actor_resident", "start")
    require_attrs(offload, "HostStash", "ActorMemory")
    require_params(offload.HostStash, "tensors", "keep", "frozen")
    require_attrs(offload.HostStash, "host_requests", "pinned_bytes", "offload", "reload", "resident")
    require_params(offload.ActorMemory.reload, "grads")
    require_attrs(pinned, "slab_sizes", "pinned_bytes", "allocator_bytes")
    require_attrs(nonfinite, "step_is_finite", "check_finite_weights", "host_bool")
    require_attrs(parallel, "bind_local_device")
    require_params(train_state.save_checkpoint, "path", "model_chunks")
    tiny_cfg(ctx)
    return {}


# ---- save_peak_memory -------------------------------------------------------------------------


class _StandInEngine:
    """vLLM's footprint while awake: `nbytes` of CUDA memory (weights + KV cache), none asleep."""

    def __init__(self, nbytes: int, device: str):
        self.nbytes, self.device, self.held = nbytes, device, []

    def sleep(self) -> None:
        self.held = []

    def wake_weights(self) -> None:
        import torch

        self.held.append(torch.empty(self.nbytes // 4, dtype=torch.uint8, device=self.device))

    def wake_kv_cache(self) -> None:
        import torch

        self.held.append(torch.empty(self.nbytes - self.nbytes // 4, dtype=torch.uint8, device=self.device))

    @property
    def awake(self) -> bool:
        return bool(self.held)


def run_save_peak_memory(ctx: Ctx) -> None:
    prepare(ctx)
    import dataclasses

    import torch

    from agpo_megatron.checkpoint.train_state import save_checkpoint
    from agpo_megatron.config.model import OffloadConfig
    from agpo_megatron.runtime import parallel
    from agpo_megatron.train.colocate import Colocation
    from agpo_megatron.train.offload import ActorMemory
    from agpo_megatron.train.policy import Actor
    from tests.gpu.common import micro_batches, policy_step, tiny_sequences

    with check(ctx, "save_peak_memory"):
        lay = parallel.init_model_parallel(1, 1, seed=1234)
        arch = dataclasses.replace(tiny_arch(ctx.dtype_name), hidden_size=512, ffn_hidden_size=2048, num_layers=4)
        cfg = tiny_cfg(ctx)
        actor = Actor(arch, cfg, lay, total_steps=10)
        seqs = tiny_sequences(arch.vocab_size)
        mbs = micro_batches(seqs)
        for mb, out in zip(mbs, actor.logprobs(mbs, temperature=1.0), strict=True):
            mb["old_logprobs"] = out["logprobs"]
        kv = int(ctx.opt("save_kv_mib", 2048)) << 20 if ctx.gpu else 1 << 20
        engine = _StandInEngine(kv, ctx.device)
        memory = ActorMemory(actor.chunks, actor.optimizer, OffloadConfig(params=True, grads=True, optimizer=True))
        colo = Colocation(engine, memory, sync=lambda: None)
        colo.start()
        colo.to_train()
        policy_step(actor, mbs, seqs)
        seen = []

        def save(tag: str) -> float:
            if ctx.gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seen.append((tag, engine.awake))
            save_checkpoint(ctx.workdir() / tag, actor.chunks, actor.optimizer, actor.scheduler, step=1)
            return gib(torch.cuda.max_memory_allocated()) if ctx.gpu else float("nan")

        with colo.actor_resident():  # the train phase, where the loop saves: nothing moves
            new = save("train_phase")
        colo.to_rollout()
        with colo.actor_resident():  # between steps: vLLM sleeps first, grads stay on host
            between = save("between_steps")
        # the old order: engine awake, everything reloaded (grads too), then the save
        memory.reload()
        old = save("old_order")
        memory.offload_train_state()
        memory.offload_params()
        status, why = judge(
            engine_asleep_at_new_saves=[a for t, a in seen if t != "old_order"] == [False, False],
            old_order_engine_awake=dict(seen)["old_order"],
            lower_peak=not ctx.gpu or (new < old and between < old),
        )
        ctx.report(
            "save_peak_memory",
            status,
            **why,
            peak_gib_train_phase=new,
            peak_gib_between_steps=between,
            peak_gib_old_order=old,
            engine_gib=gib(kv),
        )


# ---- pinned_bytes -----------------------------------------------------------------------------


def run_pinned_bytes(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.runtime import pinned
    from agpo_megatron.train.offload import HostStash

    with check(ctx, "pinned_bytes"):
        mib = 1 << 20
        # sizes just past powers of two (fc1 259 MiB, the embedding 1.02 GiB: each rounded to 2x)
        # (a tenth of them in cpu-logic: still well past the 2 MiB tail granule)
        sizes = [int(s * mib / (1 if ctx.gpu else 10)) for s in (259, 130, 67, 33)]
        tensors = [torch.randn(n // 2, dtype=torch.bfloat16, device=ctx.device) for n in sizes]
        want = [t.clone() for t in tensors]
        stashed = sum(sizes)

        def host_reserved() -> int:
            if not ctx.gpu or not hasattr(torch.cuda, "host_memory_stats"):
                return -1
            return int(torch.cuda.host_memory_stats().get("reserved_bytes.current", -1))

        before = host_reserved()
        stash = HostStash(tensors)
        stash.offload()
        stash_reserved = host_reserved() - before if before >= 0 else -1
        stash.reload()
        exact = all(torch.equal(a, b) for a, b in zip(tensors, want))
        naive_before = host_reserved()
        naive = [torch.empty(n, dtype=torch.uint8, pin_memory=ctx.gpu) for n in sizes]  # one per storage
        naive_reserved = host_reserved() - naive_before if naive_before >= 0 else -1
        del naive
        measured = stash_reserved if stash_reserved >= 0 else stash.pinned_bytes
        status, why = judge(
            restored_exact=exact,
            planned_within_5pct=stash.pinned_bytes <= 1.05 * stashed,
            measured_within_5pct=measured <= 1.05 * stashed,
        )
        ctx.report(
            "pinned_bytes",
            status,
            **why,
            stashed_mib=stashed / mib,
            planned_mib=stash.pinned_bytes / mib,
            measured_mib=stash_reserved / mib if stash_reserved >= 0 else "n/a",
            one_per_storage_mib=naive_reserved / mib if naive_reserved >= 0 else "n/a",
            one_per_storage_planned_mib=sum(pinned.allocator_bytes(n) for n in sizes) / mib,
            slabs=len(stash.host_requests),
        )


# ---- finite_check_syncs -----------------------------------------------------------------------


def run_finite_check_syncs(ctx: Ctx) -> None:
    prepare(ctx)
    import warnings

    import torch

    from agpo_megatron.runtime import nonfinite

    with check(ctx, "finite_check_syncs"):
        params = [torch.nn.Parameter(torch.randn(64, 64, device=ctx.device, dtype=torch.bfloat16)) for _ in range(200)]
        for p in params:
            p.main_grad = torch.randn(64, 64, device=ctx.device)
        metrics = [{"loss": torch.tensor(1.0, device=ctx.device), "n": 3.0}]
        converted = []
        real = nonfinite.host_bool
        nonfinite.host_bool = lambda t: converted.append(1) or real(t)

        def syncs(fn) -> int:
            converted.clear()
            if not ctx.gpu:
                fn()
                return len(converted)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return sum("synchroniz" in str(w.message) for w in caught)

        try:
            n_step = syncs(lambda: nonfinite.step_is_finite(params, metrics))
            n_weights = syncs(lambda: nonfinite.check_finite_weights([(str(i), p) for i, p in enumerate(params)], "x"))
            caught = []
            for bad in (float("nan"), float("inf"), float("-inf")):
                params[123].main_grad[5, 7] = bad
                caught.append(not nonfinite.step_is_finite(params, metrics))
                params[123].main_grad[5, 7] = 0.0
            with torch.no_grad():
                params[42][0, 0] = float("nan")
            try:
                nonfinite.check_finite_weights([(str(i), p) for i, p in enumerate(params)], "x")
                named = False
            except nonfinite.NonFiniteError as e:
                named = "first on this rank: 42" in str(e)
        finally:
            nonfinite.host_bool = real
        status, why = judge(
            one_sync_step=n_step == 1, one_sync_weights=n_weights == 1, catches_nan_inf=all(caught), names_it=named
        )
        ctx.report("finite_check_syncs", status, **why, syncs_step=n_step, syncs_weights=n_weights, tensors=200)


# ---- local_device_binding ---------------------------------------------------------------------


def run_local_device_binding(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.runtime import parallel

    with check(ctx, "local_device_binding"):
        if not ctx.gpu:
            raise Skip("needs CUDA")
        n = torch.cuda.device_count()
        saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "AGPO_TASK_LOCAL_RANK")}
        os.environ["LOCAL_RANK"] = str(n + 2)  # a task index past the visible devices
        try:
            index = parallel.bind_local_device()
            current = torch.cuda.current_device()
            torch.ones(1, device="cuda").sum().item()  # the device is usable
            vllm_sees = int(os.environ["LOCAL_RANK"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        status, why = judge(in_range=index == (n + 2) % n, bound=current == index, vllm_local_rank_valid=vllm_sees < n)
        ctx.report("local_device_binding", status, **why, visible=n, local_rank=n + 2, device=index)
