"""Smoke section: the fused loss (ops/fused_loss.py; Triton kernels of ops/triton_fused_loss.py on
CUDA) against the naive loss at Qwen2.5-7B's LM-head shape: V=152064, H=3584, N=4096 tokens, bf16.

Three lines from one set of runs:
- `fused_loss_parity`: loss, d_hidden and d_weight of both bf16 paths against an fp32 reference
  (the naive loss on fp32 copies of the same inputs, TF32 off). The fused path passes when its
  error is within max(2 x the naive bf16 error, a floor): "no worse than the naive bf16 path",
  which does not hang on a guessed absolute tolerance.
- `fused_loss_time`: fwd+bwd, median of `reps` runs after a warm-up, CUDA events; no threshold
  (timing never decides a verdict), the figures and the naive/fused ratio are printed.
- `fused_loss_memory`: peak `torch.cuda.max_memory_allocated` above the live inputs over one warm
  fwd+bwd; passes when the fused peak is below the naive one, and prints the ratio.
"""

from __future__ import annotations

import math
import statistics

from tests.gpu.common import Ctx, Skip, Timer, check, gib, judge, rel_err, require_attrs, require_params, sync, verdict

GPU_SIZES = dict(n=4096, h=3584, v=152064, chunk=1024)
CPU_SIZES = dict(n=256, h=64, v=2000, chunk=64)
TEMPERATURE = 0.7
# floors for "no worse than naive": relative to the largest entry of the fp32 reference
FLOOR = dict(loss=1e-3, d_hidden=1e-2, d_weight=1e-2)


def sizes(ctx: Ctx) -> dict[str, int]:
    base = GPU_SIZES if ctx.mode in ("gpu", "dry-run") else CPU_SIZES
    s = {k: int(ctx.opt(f"fused_{k}", v)) for k, v in base.items()}
    for k, v in s.items():
        if v < 1:
            raise ValueError(f"fused-loss size {k}={v} must be >= 1")
    if s["chunk"] > s["n"]:
        raise ValueError(f"fused-loss chunk {s['chunk']} exceeds N={s['n']}")
    return s


def estimate_gib(s: dict[str, int]) -> dict[str, float]:
    """Rough bytes of the three runs (bf16 inputs, fp32 reference), for the dry-run's size check."""
    n, h, v = s["n"], s["h"], s["v"]
    inputs = 2 * (n * h + v * h) * 2  # bf16 values + their grads
    naive = n * v * (2 + 4 * 4)  # bf16 logits + ~4 fp32 [N, V] tensors (log-softmax, exp, grads)
    ref32 = 2 * (n * h + v * h) * 4 + n * v * 4 * 5
    return dict(inputs=gib(inputs), naive=gib(naive), ref32=gib(ref32))


def prepare(ctx: Ctx) -> dict[str, object]:
    from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss  # noqa: F401
    from agpo_megatron.ops import fused_chunks
    from agpo_megatron.ops import fused_loss as fl
    from agpo_megatron.ops import triton_fused_loss as tfl

    require_attrs(fl, "fused_policy_loss_from_hidden")
    require_attrs(fused_chunks, "use_triton", "with_triton_fallback")
    require_attrs(tfl, "HAVE_TRITON", "chunk_stats", "chunk_dlogits")
    require_params(
        fl.fused_policy_loss_from_hidden,
        "hidden",
        "weight",
        "targets",
        "old_logprobs",
        "advantages",
        "mask",
        "cfg",
        "ref_logprobs",
        "temperature",
        "chunk_tokens",
    )
    _loss_cfg()
    s = sizes(ctx)
    return {**s, **{f"est_{k}_gib": round(v, 1) for k, v in estimate_gib(s).items()}}


def _loss_cfg():
    from agpo_megatron.algo.loss import PolicyLossConfig

    # KL and entropy on: the entropy gradient takes the second branch of d_logits.
    return PolicyLossConfig(kl_coef=0.01, kl_estimator="k3", entropy_coef=0.001, agg_mode="token-mean")


def _inputs(ctx: Ctx, s: dict[str, int], dtype):
    import torch

    g = torch.Generator(device=ctx.device).manual_seed(0)
    n, h, v = s["n"], s["h"], s["v"]
    hidden = torch.randn(1, n, h, device=ctx.device, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=ctx.device, generator=g) / h**0.5).to(dtype)
    guess = -math.log(v)
    return dict(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=torch.randint(0, v, (1, n), device=ctx.device, generator=g),
        mask=torch.ones(1, n, dtype=torch.bool, device=ctx.device),
        adv=torch.randn(1, device=ctx.device, generator=g),
        old=guess + 0.1 * torch.randn(1, n, device=ctx.device, generator=g),
        ref=guess + 0.1 * torch.randn(1, n, device=ctx.device, generator=g),
    )


def _naive(x):
    import torch

    from agpo_megatron.algo.loss import policy_loss

    logits = x["hidden"] @ x["weight"].t()  # [1, N, V] in the input dtype, as the output layer gives it
    logp = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    lp = logp.gather(-1, x["targets"][..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    loss, _ = policy_loss(lp, x["old"], x["adv"], x["mask"], _loss_cfg(), ref_logprobs=x["ref"], entropy=ent)
    return loss


def _fused(x, chunk):
    from agpo_megatron.ops.fused_loss import fused_policy_loss_from_hidden

    loss, _, _, _ = fused_policy_loss_from_hidden(
        x["hidden"],
        x["weight"],
        x["targets"],
        x["old"],
        x["adv"],
        x["mask"],
        _loss_cfg(),
        ref_logprobs=x["ref"],
        temperature=TEMPERATURE,
        chunk_tokens=chunk,
    )
    return loss


def _fwd_bwd(fn, x):
    x["hidden"].grad = x["weight"].grad = None
    loss = fn(x)
    loss.backward()
    return dict(loss=loss.detach().reshape(1), d_hidden=x["hidden"].grad, d_weight=x["weight"].grad)


def _measure(ctx: Ctx, fn, x, reps: int):
    """(results, peak bytes above the inputs over one warm run, median ms)."""
    import torch

    _fwd_bwd(fn, x)  # warm-up: Triton compiles here
    x["hidden"].grad = x["weight"].grad = None
    peak = float("nan")
    if ctx.gpu:
        sync(ctx)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    res = {k: v.clone() for k, v in _fwd_bwd(fn, x).items()}
    if ctx.gpu:
        sync(ctx)
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        with Timer(ctx) as t:
            _fwd_bwd(fn, x)
        times.append(t.ms)
    x["hidden"].grad = x["weight"].grad = None
    return res, peak, statistics.median(times)


def run_fused_loss(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.ops import triton_fused_loss as tfl
    from agpo_megatron.ops.fused_chunks import use_triton

    s = sizes(ctx)
    reps = int(ctx.opt("fused_reps", 3))
    results, peaks, times = {}, {}, {}
    with check(ctx, "fused_loss_parity", **s):
        triton = bool(use_triton(torch.empty(1, 1, device=ctx.device, dtype=torch.bfloat16)))
        if ctx.gpu and not triton:
            raise RuntimeError(f"the fused loss would not use Triton on CUDA (HAVE_TRITON={tfl.HAVE_TRITON})")
        # fp32 reference first, then freed: the naive loss on fp32 copies of the same bf16 inputs
        torch.backends.cuda.matmul.allow_tf32 = False
        x = _inputs(ctx, s, torch.bfloat16)
        x32 = {
            k: (v.detach().float().requires_grad_() if v.is_floating_point() and v.requires_grad else v)
            for k, v in x.items()
        }
        ref = {k: v.double() for k, v in _fwd_bwd(_naive, x32).items()}
        del x32
        for name, fn in (("naive", _naive), ("fused", lambda x: _fused(x, s["chunk"]))):
            results[name], peaks[name], times[name] = _measure(ctx, fn, x, reps)
        err = {name: {k: rel_err(r[k], ref[k]) for k in FLOOR} for name, r in results.items()}
        finite = all(bool(torch.isfinite(v).all()) for v in results["fused"].values())
        no_worse = {f"{k}_no_worse_than_naive": err["fused"][k] <= max(2 * err["naive"][k], FLOOR[k]) for k in FLOOR}
        status, why = judge(finite=finite, **no_worse)
        ctx.report(
            "fused_loss_parity",
            status,
            **why,
            **s,
            triton=triton,
            **{f"fused_err_{k}": v for k, v in err["fused"].items()},
            **{f"naive_err_{k}": v for k, v in err["naive"].items()},
            rule="fused_err<=max(2*naive_err,floor)",
        )
    if not times:
        ctx.report("fused_loss_time", "FAIL", reason="fused_loss_parity did not finish")
        ctx.report("fused_loss_memory", "FAIL", reason="fused_loss_parity did not finish")
        return
    with check(ctx, "fused_loss_time"):
        ok = all(math.isfinite(t) and t > 0 for t in times.values())
        ctx.report(
            "fused_loss_time",
            verdict(ok),
            clock="cuda_events" if ctx.gpu else "perf_counter",
            reps=reps,
            naive_ms=times["naive"],
            fused_ms=times["fused"],
            naive_over_fused=times["naive"] / times["fused"],
        )
    with check(ctx, "fused_loss_memory"):
        if not ctx.gpu:
            raise Skip("peak memory needs the CUDA allocator's statistics")
        ctx.report(
            "fused_loss_memory",
            verdict(peaks["fused"] < peaks["naive"]),
            unit="GiB_above_inputs",
            naive_gib=gib(peaks["naive"]),
            fused_gib=gib(peaks["fused"]),
            naive_over_fused=peaks["naive"] / max(peaks["fused"], 1),
        )
