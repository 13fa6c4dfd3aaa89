"""`agpo plan` output: the per-phase tables of a `MemoryPlan`, and what to change where it does not fit."""

from __future__ import annotations

import dataclasses

from agpo_megatron.plan.formulas import (
    GiB,
    hf_param_count,
    kv_bytes_per_token,
    loss_working_set,
    stage_activations,
    tokens_per_micro_batch,
    vllm_weight_bytes,
)
from agpo_megatron.plan.memory import PHASES, MemoryPlan, StagePlan


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def advice(plan: MemoryPlan, stage: StagePlan, phase: str) -> list[str]:
    """Changes that shrink `phase` on this stage, largest first, skipping what is already on."""
    cfg, tips = plan.cfg, []
    m, r, off = cfg.model, cfg.rollout, cfg.offload
    act = stage.activations
    st = stage.state
    arch, p = plan.arch, cfg.parallel
    tps = [t for t in (2, 4, 8) if t > p.tp and arch.num_query_groups % t == 0]
    pps = [k for k in range(p.pp + 1, arch.num_layers + 1) if arch.num_layers % k == 0]
    eps = [2 * p.ep] if arch.is_moe and arch.num_experts % (2 * p.ep) == 0 else []
    eps = [e for e in eps if plan.world_size % (e * p.etp * p.pp) == 0]
    more_mp = (
        "more model parallelism ("
        + " or ".join(
            ([f"parallel.tp={tps[0]}"] if tps else [])
            + ([f"parallel.pp={pps[0]}"] if pps else [])
            + ([f"parallel.ep={eps[0]} (experts only)"] if eps else [])
        )
        + "): shrinks every Megatron term, at a smaller data-parallel size"
    )
    if phase == "rollout":
        if not off.optimizer:
            tips.append((st.adam, "offload.optimizer=true"))
        if not off.grads:
            tips.append((st.grads, "offload.grads=true"))
        if not off.params:
            tips.append((st.params + st.main_params, "offload.params=true"))
        if stage.reference and not off.reference:
            tips.append((stage.reference, "offload.reference=true"))
        tips.append(
            (
                0,
                f"a lower rollout.gpu_memory_utilization (now {r.gpu_memory_utilization}; the weights alone "
                f"need {plan.vllm_weights / plan.gpu_bytes:.2f})",
            )
        )
    if phase in ("logprobs", "update", "sync", "save") and not r.enable_sleep_mode:
        tips.append((plan.vllm_total, "rollout.enable_sleep_mode=true"))
    if phase == "update":
        if not m.recompute_activations:
            tips.append((act.no_recompute - act.full_recompute, "model.recompute_activations=true"))
        if cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
            sp = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, sequence_parallel=True))
            tips.append(
                (_update_bytes(plan, stage) - _update_bytes(plan, stage, sp), "parallel.sequence_parallel=true")
            )
        if not cfg.algo.fused_loss and stage.loss.naive > stage.loss.fused:
            tips.append((stage.loss.naive - stage.loss.fused, "algo.fused_loss=true"))
    half = tokens_per_micro_batch(cfg) // 2
    if phase == "update" and half >= m.max_seq_len:
        smaller = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, max_tokens_per_micro_batch=half))
        tips.append(
            (
                _update_bytes(plan, stage) - _update_bytes(plan, stage, smaller),
                f"batch.max_tokens_per_micro_batch={half}",
            )
        )
    if phase == "sync":
        g = arch.num_query_groups  # vLLM splits the KV heads, or replicates them past rollout.tp = g
        heads = arch.num_attention_heads
        rtps = [
            t
            for t in (2, 4, 8, 16)
            if t > r.tp and plan.world_size % t == 0 and heads % t == 0 and (g % t == 0 or t % g == 0)
        ]
        if rtps:
            tips.append((plan.vllm_weights - vllm_weight_bytes(arch, rtps[0]), f"rollout.tp={rtps[0]}"))
    if phase in ("update", "sync", "save") and stage.reference and not off.reference:
        tips.append((stage.reference, "offload.reference=true"))
    tips.append((0, more_mp))
    tips.sort(key=lambda t: -t[0])
    return [f"{text} (frees {saved / GiB:.1f} GiB)" if saved else text for saved, text in tips]


def _update_bytes(plan: MemoryPlan, stage: StagePlan, cfg=None) -> int:
    """Activations + loss working set of the update phase under `cfg` (default: the plan's)."""
    cfg = cfg or plan.cfg
    act = stage_activations(plan.arch, cfg, pp_rank=stage.pp_rank, dp=plan.dp)
    loss = loss_working_set(plan.arch, cfg)
    last = stage.pp_rank == cfg.parallel.pp - 1
    return (act.full_recompute if cfg.model.recompute_activations else act.no_recompute) + (
        (loss.fused if cfg.algo.fused_loss else loss.naive) if last else 0
    )


def render(plan: MemoryPlan) -> str:
    cfg, arch = plan.cfg, plan.arch
    p, r, b = cfg.parallel, cfg.rollout, cfg.batch
    kv_tok = kv_bytes_per_token(arch, r.tp)
    kv_room = max(0, plan.vllm_total - plan.vllm_weights)
    replicas = plan.world_size // r.tp
    step_seqs = -(-b.prompts_per_rollout * cfg.algo.group_size // replicas)
    lines = [
        f"model: {arch.model_type}, {hf_param_count(arch) / 1e9:.2f}B params, {arch.num_layers} layers, hidden "
        f"{arch.hidden_size}, vocab {arch.vocab_size}{', tied' if arch.tie_word_embeddings else ''}",
        f"layout: world {plan.world_size} = tp {p.tp} x pp {p.pp} x dp {plan.dp}"
        + (
            f" (experts: ep {p.ep} x etp {p.etp} x expert-dp {plan.world_size // (p.ep * p.etp * p.pp)} x pp {p.pp})"
            if arch.is_moe
            else ""
        )
        + f"; rollout.tp {r.tp}; "
        f"{cfg.model.params_dtype}{', fp8 ' + cfg.model.fp8 if cfg.model.fp8 else ''}; "
        f"distributed optimizer {'on' if p.use_distributed_optimizer else 'off'}; "
        f"sequence parallel {'on' if p.sequence_parallel else 'off'}",
        f"micro-batch: {tokens_per_micro_batch(cfg)} tokens "
        f"({'max_tokens_per_micro_batch' if b.max_tokens_per_micro_batch else 'micro_batch_size x max_seq_len'}); "
        f"recompute {'full' if cfg.model.recompute_activations else 'off'}; "
        f"loss {'fused' if cfg.algo.fused_loss else 'naive'}",
        f"vLLM: weights {plan.vllm_weights / GiB:.2f} GiB/rank; gpu_memory_utilization {r.gpu_memory_utilization} -> "
        f"{plan.vllm_total / GiB:.2f} GiB in all, KV cache + workspace <= {kv_room / GiB:.2f} GiB "
        f"(~{kv_room // kv_tok} tokens at {kv_tok // 1024} KiB/token; a replica's {step_seqs} sequences at "
        f"max_seq_len need {step_seqs * cfg.model.max_seq_len}); "
        f"sleep {'level ' + str(r.sleep_level) if r.enable_sleep_mode else 'off'}",
        f"GPU: {plan.gpu_bytes / GiB:.0f} GiB, margin {plan.margin_bytes / GiB:.1f} GiB (CUDA context, NCCL, "
        f"fragmentation) -> usable {plan.usable / GiB:.1f} GiB",
    ]
    host = max(s.host for s in plan.stages)
    if host:
        pinned = max(s.pinned for s in plan.stages)
        lines.append(
            "host memory per rank for what is offloaded (offload.*, vLLM weights at sleep level 1): "
            f"{host / GiB:.2f} GiB, of which {pinned / GiB:.2f} GiB pinned by offload.* (power-of-two slabs)"
        )
    for stage in plan.stages:
        lines += ["", _stage_table(plan, stage)]
    misfits = plan.misfits()
    lines.append("")
    if not misfits:
        lines.append(f"fits: every phase fits {plan.gpu_bytes / GiB:.0f} GiB with the margin")
    for pp_rank, phase, over in misfits:
        stage = next(s for s in plan.stages if s.pp_rank == pp_rank)
        lines.append(f"DOES NOT FIT: {phase} on pp stage {pp_rank} is {over / GiB:.1f} GiB over; try:")
        lines += [f"  - {tip}" for tip in advice(plan, stage, phase)]
    return "\n".join(lines)


def _stage_table(plan: MemoryPlan, stage: StagePlan) -> str:
    pp = plan.cfg.parallel.pp
    where = "single stage" if pp == 1 else ("first stage" if stage.pp_rank == 0 else "last stage")
    act, loss = stage.activations, stage.loss
    head = [
        f"per-rank GiB, pp stage {stage.pp_rank} ({where}); activations per layer per micro-batch "
        f"{act.per_layer / GiB:.2f}, {act.in_flight} micro-batch(es) in flight: no recompute "
        f"{act.no_recompute / GiB:.2f}, full recompute {act.full_recompute / GiB:.2f}"
        + (f"; loss fused {loss.fused / GiB:.2f}, naive {loss.naive / GiB:.2f}" if stage.pp_rank == pp - 1 else ""),
        f"{'component':<28}" + "".join(f"{ph:>10}" for ph in PHASES),
    ]
    names = list(dict.fromkeys(k for ph in PHASES for k in stage.phases[ph]))
    rows = []
    for name in names:
        vals = [stage.phases[ph].get(name, 0) for ph in PHASES]
        if any(vals):
            rows.append(f"{name:<28}" + "".join(f"  {_gib(v)}" if v else f"{'-':>10}" for v in vals))
    total = f"{'total':<28}" + "".join(f"  {_gib(stage.total(ph))}" for ph in PHASES)
    fits = f"{'fits ' + format(plan.usable / GiB, '.1f') + ' GiB':<28}" + "".join(
        f"{'yes' if stage.total(ph) <= plan.usable else 'NO':>10}" for ph in PHASES
    )
    return "\n".join(head + rows + [total, fits])


def warnings(plan: MemoryPlan) -> list[str]:
    """One line per phase that does not fit (for `agpo check`)."""
    out = []
    for pp_rank, phase, over in plan.misfits():
        stage = next(s for s in plan.stages if s.pp_rank == pp_rank)
        tips = "; ".join(advice(plan, stage, phase)[:3])
        out.append(
            f"warning: memory: {phase} on pp stage {pp_rank} needs {over / GiB:.1f} GiB more than the "
            f"{plan.usable / GiB:.1f} GiB usable of {plan.gpu_bytes / GiB:.0f} GiB; try {tips}"
        )
    return out
