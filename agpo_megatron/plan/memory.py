"""Per-rank GPU memory of each phase of an RL step, for a config and a world size (`agpo plan`).

The formulas (exact state bytes, activation / loss / vLLM estimates) are in plan/formulas.py; this
module decides which of them are on the GPU in each phase of a step, following the docstrings of
`rollout.enable_sleep_mode` / `sleep_level` and `offload.*` in config/schema.py:
  rollout   vLLM holds `gpu_memory_utilization` x GPU (weights + KV cache + its workspace); Megatron
            state and the reference stay resident unless `offload.*` moves them to host;
  logprobs  vLLM asleep (both levels free its GPU memory); no-grad forwards of actor (+ reference);
  update    the whole training state, activations (1F1B, recompute or not) and the loss;
  sync      vLLM's weights woken (not its KV cache) plus the export's buckets in flight; the grads
            and Adam state are already on host if offloaded (train/colocate.py `to_rollout`
            offloads them before vLLM's weights wake), the params stay until the sync has read them;
  save      a checkpoint save between steps: vLLM asleep, the training state resident (its grads
            stay on host; counted anyway), one tensor's save buffers in flight (issue 18: it ran
            with vLLM awake).
Without sleep mode vLLM keeps its whole share throughout. NCCL/cuBLAS workspaces, the CUDA
context and fragmentation are not modelled; a stated safety margin covers them.
"""

from __future__ import annotations

import dataclasses

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.models.hf_config import ModelArch
from agpo_megatron.plan.formulas import (
    Activations,
    GiB,
    LossSet,
    TrainState,
    loss_working_set,
    plan_spec,
    stage_activations,
    stage_params,
    train_state,
    vllm_weight_bytes,
)
from agpo_megatron.runtime.pinned import pinned_bytes

PHASES = ("rollout", "logprobs", "update", "sync", "save")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Memory of one pipeline stage's rank in each phase of a step."""

    pp_rank: int
    """The stage (first and last are planned; middle stages hold less than the first)."""
    state: TrainState
    """The actor's params, grad buffer and optimizer state on this rank."""
    reference: int
    """Frozen reference params (0 when KL is off)."""
    activations: Activations
    """Training and forward-only activations, both recompute settings."""
    loss: LossSet
    """The loss working set, fused and naive (used on the last stage only)."""
    phases: dict[str, dict[str, int]]
    """phase -> {component: bytes on the GPU}."""
    host: int
    """Host memory this rank's offloads take at their peak (pinned, outside the GPU)."""
    pinned: int = 0
    """Of `host`, what this project's stashes pin (power-of-two slabs, runtime/pinned.py); the rest is vLLM's."""

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The plan of every distinct pipeline stage, and the GPU it is measured against."""

    arch: ModelArch
    """The model shape (from config.json)."""
    cfg: TrainConfig
    """The planned config."""
    world_size: int
    """GPUs in the job."""
    dp: int
    """Data-parallel size = world / (tp x pp)."""
    gpu_bytes: int
    """Memory of one GPU."""
    margin_bytes: int
    """Reserved for what is not modelled (see `default_margin`)."""
    vllm_weights: int
    """vLLM's weights on one rank (rollout.tp shard)."""
    vllm_total: int
    """All vLLM claims while awake: gpu_memory_utilization x GPU."""
    sync_buffers: int
    """The weight export's bucket + one full tensor in flight."""
    stages: list[StagePlan]
    """First (and last, when pp > 1) stage."""

    @property
    def usable(self) -> int:
        return self.gpu_bytes - self.margin_bytes

    def misfits(self) -> list[tuple[int, str, int]]:
        """(pp_rank, phase, bytes over the usable memory) for every phase that does not fit."""
        return [
            (s.pp_rank, ph, s.total(ph) - self.usable)
            for s in self.stages
            for ph in PHASES
            if s.total(ph) > self.usable
        ] + [
            (s.pp_rank, "rollout", self.vllm_weights - self.vllm_total)
            for s in self.stages[:1]
            if self.vllm_weights >= self.vllm_total
        ]


def default_margin(gpu_bytes: int) -> int:
    """CUDA context + NCCL communicators + cuBLAS workspaces (~2-3 GiB per process), what vLLM keeps
    while asleep (CUDA graph pool, ~1 GiB) and allocator fragmentation (~5%): 4 GiB + 5%."""
    return 4 * GiB + gpu_bytes // 20


def plan_memory(
    cfg: TrainConfig, world_size: int, *, gpu_gb: float = 80.0, margin_gb: float | None = None
) -> MemoryPlan:
    """The plan for `cfg` on `world_size` GPUs of `gpu_gb` GiB each (needs `model.hf_path/config.json`)."""
    from agpo_megatron.bridge.export import DEFAULT_BUCKET_BYTES
    from agpo_megatron.models.hf_config import read_arch

    dp = cfg.check_world(world_size)
    arch = read_arch(cfg.model.hf_path)
    gpu = int(gpu_gb * GiB)
    margin = default_margin(gpu) if margin_gb is None else int(margin_gb * GiB)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    r, off = cfg.rollout, cfg.offload
    kl_on = cfg.algo.loss.kl_coef > 0 or cfg.algo.adaptive_kl_target is not None
    vllm_w = vllm_weight_bytes(arch, r.tp)
    vllm_total = int(r.gpu_memory_utilization * gpu)
    # Both sleep levels free vLLM's weights and KV cache on the GPU; without sleep mode it keeps all.
    # Disaggregated: the trainer ranks hold no vLLM at all and offload nothing (nothing shares their
    # devices, train/colocate.py); the rollout ranks hold vLLM only: its weights must fit its share.
    disagg = r.placement == "disaggregated"
    idle = {} if r.enable_sleep_mode or disagg else {"vLLM (no sleep mode)": vllm_total}
    # Sync: one byte-bounded bucket plus one full tensor in flight, ~3x at worst (bridge/export.py).
    largest = max(p.nbytes for p in stage_params(arch, tp=1, pp=1, pp_rank=0, params_dtype="bfloat16"))
    sync_buf = DEFAULT_BUCKET_BYTES + 3 * largest
    # Save: torch_dist writes tensor by tensor; one fp32 copy (a main param or an Adam moment) in flight, x2.
    save_buf = 2 * 4 * max(p.numel for p in stage_params(arch, tp=tp, pp=1, pp_rank=0, params_dtype="float32"))
    stages = []
    for pp_rank in sorted({0, pp - 1}):
        ep, etp = cfg.parallel.ep, cfg.parallel.etp
        params = stage_params(
            arch,
            tp=tp,
            pp=pp,
            pp_rank=pp_rank,
            params_dtype=cfg.model.params_dtype,
            spec=plan_spec(cfg),
            ep=ep,
            etp=etp,
        )
        st = train_state(
            params,
            dp=dp,
            distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            tied_pp=arch.tie_word_embeddings and pp > 1,
            expert_dp=world_size // (etp * ep * pp),
        )
        ref = sum(p.nbytes for p in params) if kl_on else 0
        linear = ("linear_qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")
        fp8_cache = 2 * sum(p.numel for p in params if p.name.endswith(linear)) if cfg.model.fp8 else 0
        act = stage_activations(arch, cfg, pp_rank=pp_rank, dp=dp)
        loss = loss_working_set(arch, cfg)
        last = pp_rank == pp - 1
        train_act = act.full_recompute if cfg.model.recompute_activations else act.no_recompute
        loss_train = (loss.fused if cfg.algo.fused_loss else loss.naive) if last else 0
        # logprob_mode=rollout without a reference: no Megatron forward in this phase at all.
        scores = r.logprob_mode == "recompute" or kl_on
        fwd_act = act.forward_only if scores else 0
        loss_fwd = (loss.fused_forward if cfg.algo.fused_loss else loss.naive_forward) if last and scores else 0

        def megatron(offloaded: bool, st=st, params_too: bool = True) -> dict[str, int]:  # st: this stage's
            """`offloaded`: what offload.* moves to host is gone; `params_too=False`: except the params
            (the sync reads them: train/colocate.py offloads grads + Adam state before vLLM's weights
            wake and the params only after the sync)."""
            params_off = offloaded and off.params and params_too
            return {
                "actor params": 0 if params_off else st.params,
                "actor grad buffer": 0 if offloaded and off.grads else st.grads,
                "optimizer main params": 0 if params_off else st.main_params,
                "optimizer Adam m, v": 0 if offloaded and off.optimizer else st.adam,
            }

        ref_resident = ref if disagg else 0 if off.reference else ref
        phases = {
            "rollout": {**megatron(False), "reference params": ref}  # the trainer ranks wait for the rollout ranks
            if disagg
            else {
                **megatron(True),
                "reference params": ref_resident,
                "vLLM weights": vllm_w,
                "vLLM KV cache + workspace": max(0, vllm_total - vllm_w),
            },
            "logprobs": {
                **megatron(False),
                "reference params": ref,
                "activations": fwd_act,
                "loss working set": loss_fwd,
                "fp8 weight copies": fp8_cache,
                **idle,
            },
            "update": {
                **megatron(False),
                "reference params": ref_resident,
                "activations": train_act,
                "loss working set": loss_train,
                "fp8 weight copies": fp8_cache,
                **idle,
            },
            "sync": {
                **megatron(not disagg, params_too=False),
                "reference params": ref_resident,
                "weight-sync buffers": sync_buf,
                **({"vLLM weights": vllm_w} if r.enable_sleep_mode and not disagg else idle),
            },
            "save": {
                **megatron(False),
                "reference params": ref_resident,
                "checkpoint save buffers": save_buf,
                **idle,
            },
        }
        # What the stashes (train/offload.py) keep on host; grads are discarded, not kept.
        stashes = [
            st.params + st.main_params if off.params else 0,
            st.adam if off.optimizer else 0,
            ref if off.reference else 0,
        ]
        pinned = 0 if disagg else sum(pinned_bytes(n) for n in stashes)
        host = pinned + (vllm_w if r.enable_sleep_mode and r.sleep_level == 1 and not disagg else 0)
        stages.append(StagePlan(pp_rank, st, ref, act, loss, phases, host, pinned))
    return MemoryPlan(arch, cfg, world_size, dp, gpu, margin, vllm_w, vllm_total, sync_buf, stages)
