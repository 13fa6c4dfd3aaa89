"""Smoke sections with Transformer Engine: the TE layer spec (bf16 forward/backward), FP8
(`model.fp8`, Hopper+), and a local <-> TE checkpoint round trip through checkpoint/train_state.py.

The round trip saves a local-spec model with `save_checkpoint`, loads it into a TE-spec model
with `load_checkpoint` (the TE model asks for `_extra_state` keys a local checkpoint lacks: issue
8, D6), saves that, and loads it back into a fresh local model. Parameters are matched through
the bridge's name table (the two specs name the fused norms differently) and must be bitwise
equal. In the cpu-logic mode the same code runs local -> local, which checks only the calls.
"""

from __future__ import annotations

from tests.gpu.common import Ctx, Skip, check, judge, require_attrs, require_params, tiny_arch, tiny_cfg


def prepare(ctx: Ctx) -> None:
    from agpo_megatron.bridge import hf_io, names
    from agpo_megatron.checkpoint import train_state
    from agpo_megatron.models import build, forward  # noqa: F401

    require_attrs(train_state, "save_checkpoint", "load_checkpoint")
    require_params(train_state.save_checkpoint, "path", "model_chunks")
    require_params(train_state.load_checkpoint, "path", "model_chunks")
    require_attrs(build, "build_gpt", "te_available", "resolve_spec", "fused_rope_available", "transformer_config")
    require_params(build.fusion_flags, "on_gpu", "spec")
    require_attrs(hf_io, "spec_of")
    require_attrs(names, "param_rules")
    tiny_cfg(ctx, spec="te")
    tiny_cfg(ctx, spec="te", fp8="hybrid")


def _needs_te(ctx: Ctx) -> None:
    if not ctx.gpu:
        raise Skip("Transformer Engine needs CUDA")


def _init():
    from agpo_megatron.runtime import parallel

    return parallel.init_model_parallel(1, 1, seed=1234)


def _fwd_bwd(model, arch, b: int, s: int) -> bool:
    """Forward + backward by hand on the bare GPTModel (s a multiple of 16: FP8 GEMM shapes)."""
    import torch

    from agpo_megatron.models import forward

    tokens = torch.randint(0, arch.vocab_size, (b, s), device="cuda")
    pos = torch.arange(s, device="cuda").unsqueeze(0).expand(b, -1)
    logits = model(tokens, pos, None)
    lp, _ = forward.vocab_parallel_logprobs(logits, torch.roll(tokens, -1, 1))
    (-lp.mean()).backward()
    torch.cuda.synchronize()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return bool(torch.isfinite(lp).all()) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def run_te_spec(ctx: Ctx) -> None:
    prepare(ctx)
    from agpo_megatron.bridge import names
    from agpo_megatron.bridge.hf_io import spec_of
    from agpo_megatron.models import build

    with check(ctx, "te_spec_fwd_bwd"):
        _needs_te(ctx)
        _init()
        arch, cfg = tiny_arch(ctx.dtype_name), tiny_cfg(ctx, spec="te")
        model = build.build_gpt(arch, cfg.model, cfg.parallel)
        have = {n for n, _ in model.named_parameters()}
        want = {r.megatron for r in names.param_rules(arch, "te")}
        status, why = judge(
            fwd_bwd_finite=_fwd_bwd(model, arch, 2, 64), spec_te=spec_of(model) == "te", names_match_bridge=have == want
        )
        ctx.report(
            "te_spec_fwd_bwd",
            status,
            **why,
            spec_of=spec_of(model),
            qkv=type(model.decoder.layers[0].self_attention.linear_qkv).__name__,
            unmapped=",".join(sorted(have - want)[:3]) or "none",
            missing=",".join(sorted(want - have)[:3]) or "none",
        )


def run_te_fp8(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.models import build

    with check(ctx, "te_fp8_fwd_bwd"):
        _needs_te(ctx)
        cc = torch.cuda.get_device_capability()
        if cc < (8, 9):
            raise Skip(f"compute capability {cc[0]}.{cc[1]} has no FP8 (needs 8.9+)")
        _init()
        arch, cfg = tiny_arch(ctx.dtype_name), tiny_cfg(ctx, spec="te", fp8="hybrid")
        model = build.build_gpt(arch, cfg.model, cfg.parallel)
        c = model.config
        status, why = judge(fwd_bwd_finite=_fwd_bwd(model, arch, 2, 64), fp8_on=c.fp8 == "hybrid")
        ctx.report(
            "te_fp8_fwd_bwd",
            status,
            **why,
            fp8=c.fp8,
            recipe=c.fp8_recipe,
            amax_history_len=c.fp8_amax_history_len,
            amax_algo=c.fp8_amax_compute_algo,
        )


def _by_hf_name(model, arch) -> dict[str, object]:
    """{hf-ish key: parameter} through the bridge's rules, so local and TE names line up."""
    from agpo_megatron.bridge import names
    from agpo_megatron.bridge.hf_io import spec_of

    params = dict(model.named_parameters())
    return {"+".join(r.hf): params[r.megatron] for r in names.param_rules(arch, spec_of(model))}


def run_te_checkpoint_roundtrip(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
    from agpo_megatron.models import build

    with check(ctx, "te_checkpoint_roundtrip"):
        if ctx.gpu and not build.te_available():
            raise Skip("transformer_engine is not importable")
        _init()
        other = "te" if ctx.gpu else "local"  # cpu-logic: local -> local, the calls only
        arch = tiny_arch(ctx.dtype_name)
        root = ctx.workdir()

        def fresh(spec: str, seed: int):
            torch.manual_seed(seed)
            cfg = tiny_cfg(ctx, spec=spec)
            model = build.build_gpt(arch, cfg.model, cfg.parallel)
            with torch.no_grad():  # distinct random weights per model, so a no-op load cannot pass
                for p in model.parameters():
                    p.copy_(torch.randn_like(p) * 0.02 + seed)
            return model

        local = fresh("local", 1)
        save_checkpoint(root / "from_local", [local], step=3)
        te = fresh(other, 2)
        restored = load_checkpoint(root / "from_local", [te])
        a, b = _by_hf_name(local, arch), _by_hf_name(te, arch)
        to_other = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        save_checkpoint(root / "from_other", [te], step=4)
        back = fresh("local", 3)
        load_checkpoint(root / "from_other", [back])
        c = _by_hf_name(back, arch)
        to_local = all(torch.equal(a[k], c[k]) for k in a)
        status, why = judge(local_to_other=to_other, back_to_local=to_local, step=restored.step == 3)
        ctx.report(
            "te_checkpoint_roundtrip",
            status,
            **why,
            path=f"local->{other}->local",
            tensors=len(a),
            local_to_other_exact=to_other,
            back_to_local_exact=to_local,
            step=restored.step,
        )


def run_te_packed_thd(ctx: Ctx) -> None:
    """Packed micro-batches (THD, `PackedSeqParams`) against padded ones on the TE spec: per-sequence
    log-probs agree, and a packed forward/backward has finite gradients. cpu-logic: the local spec."""
    prepare(ctx)
    import torch

    from agpo_megatron.models import build, forward
    from agpo_megatron.train import batch as batching
    from agpo_megatron.train.packing import unpack
    from tests.gpu.common import micro_batches, rel_err, tiny_sequences

    require_attrs(forward, "run_model", "compute_logprobs", "forward_backward")
    require_params(batching.split_micro_batches, "packing")
    with check(ctx, "te_packed_thd"):
        if ctx.gpu and not build.te_available():
            raise Skip("transformer_engine is not importable")
        lay = _init()  # noqa: F841
        arch = tiny_arch(ctx.dtype_name)
        cfg = tiny_cfg(ctx, spec="te" if ctx.gpu else "local")
        torch.manual_seed(0)
        model = build.build_gpt(arch, cfg.model, cfg.parallel)
        ddp, _, _ = build.wrap_for_training(model, cfg.optim, cfg.parallel, total_steps=1)
        seqs = tiny_sequences(arch.vocab_size)
        padded = micro_batches(seqs)
        packed = batching.split_micro_batches(
            seqs, micro_batch_size=2, max_tokens=None, pad_id=0, uniform_length=False, packing=True
        )
        lp_pad = [
            r["logprobs"][i, : len(seqs.tokens[2 * k + i])]
            for k, r in enumerate(forward.compute_logprobs([ddp], padded))
            for i in range(2)
        ]
        lp_pack = [None] * len(seqs)
        for mb, r in zip(packed, forward.compute_logprobs([ddp], packed)):
            for i, v in zip(mb["seq_index"].tolist(), unpack(mb, r["logprobs"])):
                lp_pack[i] = v
        err = max(rel_err(a, b) for a, b in zip(lp_pack, lp_pad))
        ddp.zero_grad_buffer()

        def loss_fn(logits, mb):
            lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"])
            return -(lp * mb["loss_mask"]).sum() / 100.0, {}

        forward.forward_backward([ddp], packed, loss_fn, forward_only=False)
        grads_ok = all(bool(torch.isfinite(p.main_grad).all()) for p in model.parameters())
        tol = 2e-2 if ctx.dtype_name == "bfloat16" else 1e-5
        status, why = judge(
            logprobs_match=err <= tol,
            grads_finite=grads_ok,
            fewer_tokens=sum(m["tokens"].numel() for m in packed) < sum(m["tokens"].numel() for m in padded),
        )
        ctx.report("te_packed_thd", status, **why, spec=getattr(model, "agpo_spec", "?"), rel_err=f"{err:.2e}", tol=tol)


def run_te_rope_fusion_thd(ctx: Ctx) -> None:
    """Issue 18 item 4: the TE spec builds with `apply_rope_fusion` on, and Megatron's fused THD RoPE
    (TE's kernel) matches the unfused one on a packed `[T, heads, d]` stream with `cu_seqlens`,
    forward and gradient. GPU with Transformer Engine only."""
    prepare(ctx)
    import dataclasses

    import torch

    from agpo_megatron.models import build

    with check(ctx, "te_rope_fusion_thd"):
        _needs_te(ctx)
        if not build.te_available():
            raise Skip("transformer_engine is not importable")
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        _init()
        arch, cfg = tiny_arch(ctx.dtype_name), tiny_cfg(ctx, spec="te")
        fused_cfg = build.transformer_config(arch, cfg.model, cfg.parallel)
        unfused_cfg = dataclasses.replace(fused_cfg, apply_rope_fusion=False)
        lens = [37, 52, 61, 29]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        t = torch.randn(sum(lens), 4, arch.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        freqs = RotaryEmbedding(kv_channels=arch.head_dim, rotary_percent=1.0, rotary_base=10000)(max(lens))
        outs = {}
        for name, c in (("fused", fused_cfg), ("unfused", unfused_cfg)):
            x = t.clone().requires_grad_(True)
            y = apply_rotary_pos_emb(x, freqs, c, cu_seqlens=cu)
            y.float().pow(2).sum().backward()
            outs[name] = (y.detach().float(), x.grad.float())
        fwd = (outs["fused"][0] - outs["unfused"][0]).abs().max().item()
        bwd = (outs["fused"][1] - outs["unfused"][1]).abs().max().item()
        status, why = judge(
            te_spec_fuses=bool(fused_cfg.apply_rope_fusion), fwd_match=fwd <= 2e-2, grad_match=bwd <= 5e-2
        )
        ctx.report("te_rope_fusion_thd", status, **why, max_abs_fwd=fwd, max_abs_grad=bwd, tokens=sum(lens))
