"""The fused loss's per-chunk statistics (ops/fused_loss.py): PyTorch kernels, their Triton
versions' dispatch and fallback, and the tensor-parallel combination of the statistics.

A chunk of `chunk_tokens` tokens' logits (`[c, V/TP]`, from hidden states or given) is reduced to
four fp32 statistics per token (per-rank max, sum exp, entropy sum, target logit), combined over
TP with two all-reduces into log p(target), entropy and log-sum-exp; `chunk_dlogits` gives the
chunk's logit gradient from those. The formulas: docs/fused-loss.md. `fused_loss.py` holds the
autograd functions and the public ops built on these.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from agpo_megatron.ops import triton_fused_loss

# ---------------------------------------------------------------------------------------------
# per-chunk kernels (plain PyTorch; the Triton versions compute the same four statistics)


def scaled(logits: torch.Tensor, temperature: float, owned: bool) -> torch.Tensor:  # [c, V/TP]
    """`logits / T` in the compute dtype (fp32, or fp64 for fp64 inputs), as a tensor the caller
    may overwrite. `owned` says whether `logits` itself is a scratch buffer."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not owned and z.data_ptr() == logits.data_ptr():
        z = z.clone()  # .to() was a no-op: never write into the caller's logits
    return z.div_(temperature) if temperature != 1.0 else z


def chunk_stats_torch(
    logits: torch.Tensor,  # [c, V/TP]
    local_targets: torch.Tensor,  # [c] index into this rank's slice, -1 = not in it
    temperature: float,
    owned: bool,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:  # 4 x [c]
    """(m, s, w, z_t) of this rank's slice: max, sum exp(z - m), sum exp(z - m)(z - m), z_target.

    The ops mirror `vocab_parallel_logprobs` one for one; at TP=1 the results agree with it to
    the last bit or two (reductions over chunk-shaped tensors may vectorise differently).
    """
    z = scaled(logits, temperature, owned)
    m = z.amax(dim=-1)
    picked = z.gather(1, local_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    z_t = torch.where(local_targets >= 0, picked, 0.0)
    z = z.sub_(m.unsqueeze(1))
    exp_z = z.exp()
    s = exp_z.sum(dim=-1)
    w = exp_z.mul_(z).sum(dim=-1) if with_entropy else None
    return m, s, w, z_t


def chunk_dlogits_torch(
    logits: torch.Tensor,  # [c, V/TP]
    local_targets: torch.Tensor,  # [c], -1 = not in this slice
    lse: torch.Tensor,  # [c] log-sum-exp of z over the whole vocabulary
    entropy: torch.Tensor,  # [c]
    g_lp: torch.Tensor | None,  # [c] dL/dlogprob
    g_ent: torch.Tensor | None,  # [c] dL/dentropy
    temperature: float,
    owned: bool,
) -> torch.Tensor:  # [c, V/TP] in the dtype of `logits`
    """dL/dlogits for one chunk; in-place ops keep it at two fp32 `[c, V/TP]` buffers."""
    log_p = scaled(logits, temperature, owned).sub_(lse.unsqueeze(1))
    p = log_p.exp()
    if g_ent is not None:
        # -p (g_lp + g_H (log p + H)), built in log_p's buffer
        dz = log_p.add_(entropy.unsqueeze(1)).mul_(g_ent.unsqueeze(1))
        if g_lp is not None:
            dz.add_(g_lp.unsqueeze(1))
        dz = dz.mul_(p).neg_()
        del p
    else:
        del log_p
        dz = p.mul_(-g_lp.unsqueeze(1))
    if g_lp is not None:
        # + g_lp at the target column; rows whose target is on another rank add 0 at column 0.
        src = torch.where(local_targets >= 0, g_lp, 0.0).to(dz.dtype)
        dz.scatter_add_(1, local_targets.clamp(min=0).unsqueeze(1), src.unsqueeze(1))
    if temperature != 1.0:
        dz.div_(temperature)
    return dz.to(logits.dtype)


triton_failure: str | None = None
"""Why the Triton kernels were turned off in this process (None while they are usable)."""


def use_triton(logits: torch.Tensor) -> bool:
    return triton_failure is None and logits.is_cuda and triton_fused_loss.HAVE_TRITON and logits.dtype != torch.float64


def with_triton_fallback(triton_fn, torch_fn):
    """`triton_fn()`, or `torch_fn()` once Triton has failed in this process.

    NOTE: Triton can import and still fail at the first launch (no C compiler for its launcher,
    an unsupported GPU, a driver/PTX mismatch). The PyTorch path computes the same values, so a
    compile or launch failure turns Triton off for the process with one warning instead of
    failing the step. Out-of-memory is not a Triton problem and is raised as is.
    """
    global triton_failure
    try:
        return triton_fn()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compile/launch failure; the fallback is exact
        triton_failure = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(f"fused loss: Triton kernels failed ({triton_failure}); using the PyTorch path", stacklevel=2)
        return torch_fn()


def chunk_stats(logits, local_targets, temperature, owned, with_entropy):
    def triton_path():
        m, s, w, z_t = triton_fused_loss.chunk_stats(logits, local_targets, temperature)
        return m, s, (w if with_entropy else None), z_t

    def torch_path():
        return chunk_stats_torch(logits, local_targets, temperature, owned, with_entropy)

    return with_triton_fallback(triton_path, torch_path) if use_triton(logits) else torch_path()


def chunk_dlogits(logits, local_targets, lse, entropy, g_lp, g_ent, temperature, owned):
    def triton_path():
        return triton_fused_loss.chunk_dlogits(logits, local_targets, lse, entropy, g_lp, g_ent, temperature)

    def torch_path():
        return chunk_dlogits_torch(logits, local_targets, lse, entropy, g_lp, g_ent, temperature, owned)

    return with_triton_fallback(triton_path, torch_path) if use_triton(logits) else torch_path()


# ---------------------------------------------------------------------------------------------
# tensor parallelism


def combine(
    m: torch.Tensor,  # [c] per-rank max
    s: torch.Tensor,  # [c]
    w: torch.Tensor | None,  # [c]
    z_t: torch.Tensor,  # [c] target logit, 0 where the target is on another rank
    group: dist.ProcessGroup | None,
    tp_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # logprobs, entropy, lse: [c]
    """Merge the per-rank statistics (docs/fused-loss.md) and turn them into log p(t), H, lse."""
    if tp_size > 1:
        m_local = m
        m = m_local.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shift = m_local - m  # <= 0
        scale = shift.exp()
        parts = [s * scale, z_t]
        if w is not None:
            parts.append(scale * (w + shift * s))
        packed = torch.stack(parts)  # [2 or 3, c]: one all-reduce for all sums
        dist.all_reduce(packed, group=group)
        s, z_t = packed[0], packed[1]
        w = packed[2] if w is not None else None
    log_s = s.log()
    logprobs = (z_t - m) - log_s
    entropy = log_s - w / s if w is not None else None
    return logprobs, entropy, m + log_s


# ---------------------------------------------------------------------------------------------
# the op


def chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of the logits: computed from hidden states, or a view of the given logits."""
    return x[lo:hi] if weight is None else x[lo:hi] @ weight.t()


def local_targets(targets: torch.Tensor, v_local: int, tp_rank: int) -> torch.Tensor:  # [N]
    local = targets.long() - tp_rank * v_local
    return torch.where((local >= 0) & (local < v_local), local, -1)


def forward_chunks(x, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy):
    """Per-token (logprobs, entropy, lse), each [N] fp32 (fp64 for fp64 inputs)."""
    n = x.shape[0]
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    logprobs = torch.empty(n, dtype=out_dtype, device=x.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    for lo in range(0, n, chunk_tokens):
        hi = min(lo + chunk_tokens, n)
        logits = chunk_logits(x, weight, lo, hi)
        stats = chunk_stats(logits, local_targets[lo:hi], temperature, weight is not None, with_entropy)
        del logits
        lp, ent, lse_c = combine(*stats, group, tp_size)
        logprobs[lo:hi] = lp
        lse[lo:hi] = lse_c
        if entropy is not None:
            entropy[lo:hi] = ent
    return logprobs, entropy, lse
