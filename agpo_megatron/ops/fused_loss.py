"""Chunked, vocab-parallel policy loss that never holds a full-vocabulary fp32 tensor.

How it works, with the formulas: docs/fused-loss.md. In short:

* The vocab-sized work runs over chunks of `chunk_tokens` tokens; each chunk's logits are reduced
  to four fp32 statistics per token (per-rank max, sum exp, entropy sum, target logit), combined
  over TP with two all-reduces. At most about three `[chunk_tokens, V/TP]` temporaries are alive.
* `fused_policy_loss_from_hidden`: the gradients are computed eagerly in forward, chunk by chunk
  (logits `hidden[c] @ W.T`, per-token upstream gradients from `policy_loss`, `d_logits`, then
  d_hidden and d_W), so the `[N, V/TP]` logits never exist; backward only scales the saved
  d_hidden `[N, H]` and d_W `[V/TP, H]`, once per forward. Returned log-probs / entropy are detached.
* GSPO (`ratio_level="sequence"`) couples the tokens of a sequence, which may span chunks: the
  hidden-states variant then finishes every chunk's statistics before any gradient (two passes).
* `fused_policy_loss_from_logits`: differentiable `[B, S]` log-probs and entropy; backward
  recomputes each chunk's `d_logits` from the saved `[N]` statistics and the caller's logits.
* `fused_logprobs_entropy`: forward only (old / reference log-probs).
* d_hidden is this rank's partial sum over its vocab slice: feed `hidden` through
  `models/lm_head.py` (`capture_lm_head_input`, or `copy_to_tp_region`), whose backward reduces it.

Per-token tensors are `[B, S]`; packed rows name their sequences with `seq_ids` (train/packing.py).
Departures from the reference, numerical only: at TP > 1 the statistics are combined from
per-rank shifts (~1e-7 relative in fp32); with 16-bit weights the weight gradient is accumulated
over chunks in fp32 and the loss's upstream gradient multiplies d_hidden / d_W after rounding;
every token is processed, masked or not.

On CUDA with Triton, the per-chunk statistics and `d_logits` come from `ops/triton_fused_loss.py`.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import GlobalCount, Metrics, PolicyLossConfig, policy_loss
from agpo_megatron.ops import triton_fused_loss
from agpo_megatron.runtime.parallel import resolve_tp_group

__all__ = [
    "fused_policy_loss_from_hidden",
    "fused_policy_loss_from_logits",
    "fused_logprobs_entropy",
]


# ---------------------------------------------------------------------------------------------
# per-chunk kernels (plain PyTorch; the Triton versions compute the same four statistics)


def _scaled(logits: torch.Tensor, temperature: float, owned: bool) -> torch.Tensor:  # [c, V/TP]
    """`logits / T` in the compute dtype (fp32, or fp64 for fp64 inputs), as a tensor the caller
    may overwrite. `owned` says whether `logits` itself is a scratch buffer."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not owned and z.data_ptr() == logits.data_ptr():
        z = z.clone()  # .to() was a no-op: never write into the caller's logits
    return z.div_(temperature) if temperature != 1.0 else z


def _chunk_stats_torch(
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
    z = _scaled(logits, temperature, owned)
    m = z.amax(dim=-1)
    picked = z.gather(1, local_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    z_t = torch.where(local_targets >= 0, picked, 0.0)
    z = z.sub_(m.unsqueeze(1))
    exp_z = z.exp()
    s = exp_z.sum(dim=-1)
    w = exp_z.mul_(z).sum(dim=-1) if with_entropy else None
    return m, s, w, z_t


def _chunk_dlogits_torch(
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
    log_p = _scaled(logits, temperature, owned).sub_(lse.unsqueeze(1))
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


_triton_failure: str | None = None
"""Why the Triton kernels were turned off in this process (None while they are usable)."""


def _use_triton(logits: torch.Tensor) -> bool:
    return (
        _triton_failure is None and logits.is_cuda and triton_fused_loss.HAVE_TRITON and logits.dtype != torch.float64
    )


def _with_triton_fallback(triton_fn, torch_fn):
    """`triton_fn()`, or `torch_fn()` once Triton has failed in this process.

    NOTE: Triton can import and still fail at the first launch (no C compiler for its launcher,
    an unsupported GPU, a driver/PTX mismatch). The PyTorch path computes the same values, so a
    compile or launch failure turns Triton off for the process with one warning instead of
    failing the step. Out-of-memory is not a Triton problem and is raised as is.
    """
    global _triton_failure
    try:
        return triton_fn()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any compile/launch failure; the fallback is exact
        _triton_failure = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        warnings.warn(f"fused loss: Triton kernels failed ({_triton_failure}); using the PyTorch path", stacklevel=2)
        return torch_fn()


def _chunk_stats(logits, local_targets, temperature, owned, with_entropy):
    def triton_path():
        m, s, w, z_t = triton_fused_loss.chunk_stats(logits, local_targets, temperature)
        return m, s, (w if with_entropy else None), z_t

    def torch_path():
        return _chunk_stats_torch(logits, local_targets, temperature, owned, with_entropy)

    return _with_triton_fallback(triton_path, torch_path) if _use_triton(logits) else torch_path()


def _chunk_dlogits(logits, local_targets, lse, entropy, g_lp, g_ent, temperature, owned):
    def triton_path():
        return triton_fused_loss.chunk_dlogits(logits, local_targets, lse, entropy, g_lp, g_ent, temperature)

    def torch_path():
        return _chunk_dlogits_torch(logits, local_targets, lse, entropy, g_lp, g_ent, temperature, owned)

    return _with_triton_fallback(triton_path, torch_path) if _use_triton(logits) else torch_path()


# ---------------------------------------------------------------------------------------------
# tensor parallelism


def _combine(
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


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of the logits: computed from hidden states, or a view of the given logits."""
    return x[lo:hi] if weight is None else x[lo:hi] @ weight.t()


def _local_targets(targets: torch.Tensor, v_local: int, tp_rank: int) -> torch.Tensor:  # [N]
    local = targets.long() - tp_rank * v_local
    return torch.where((local >= 0) & (local < v_local), local, -1)


def _forward_chunks(x, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy):
    """Per-token (logprobs, entropy, lse), each [N] fp32 (fp64 for fp64 inputs)."""
    n = x.shape[0]
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    logprobs = torch.empty(n, dtype=out_dtype, device=x.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if with_entropy else None
    for lo in range(0, n, chunk_tokens):
        hi = min(lo + chunk_tokens, n)
        logits = _chunk_logits(x, weight, lo, hi)
        stats = _chunk_stats(logits, local_targets[lo:hi], temperature, weight is not None, with_entropy)
        del logits
        lp, ent, lse_c = _combine(*stats, group, tp_size)
        logprobs[lo:hi] = lp
        lse[lo:hi] = lse_c
        if entropy is not None:
            entropy[lo:hi] = ent
    return logprobs, entropy, lse


class _LogprobsEntropy(torch.autograd.Function):
    """(x [N, D], weight [V/TP, H] or None, local targets [N]) -> (logprobs [N], entropy [N]).

    x is hidden states (D = H) when weight is given, else logits (D = V/TP).
    """

    @staticmethod
    def forward(ctx, x, weight, local_targets, temperature, chunk_tokens, group, tp_size):
        logprobs, entropy, lse = _forward_chunks(
            x, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy=True
        )
        ctx.save_for_backward(x, weight, local_targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        # Unused outputs (entropy when entropy_coef = 0) arrive as None and skip their term.
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        x, weight, local_targets, lse, entropy = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None, None
        n = x.shape[0]
        d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        d_w = None
        if need_w:
            # fp32 accumulator across chunks (module docstring); fp32 weights accumulate in place.
            d_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for lo in range(0, n, ctx.chunk_tokens):
            hi = min(lo + ctx.chunk_tokens, n)
            logits = _chunk_logits(x, weight, lo, hi)
            d_logits = _chunk_dlogits(
                logits,
                local_targets[lo:hi],
                lse[lo:hi],
                entropy[lo:hi],
                None if g_lp is None else g_lp[lo:hi],
                None if g_ent is None else g_ent[lo:hi],
                ctx.temperature,
                weight is not None,
            )  # [c, V/TP]
            del logits
            if weight is None:
                d_x[lo:hi] = d_logits
                continue
            if need_x:
                torch.mm(d_logits, weight, out=d_x[lo:hi])
            if need_w:
                if d_w.dtype == d_logits.dtype:
                    d_w.addmm_(d_logits.t(), x[lo:hi])
                else:
                    d_w.add_(d_logits.t() @ x[lo:hi])
        if d_w is not None:
            d_w = d_w.to(weight.dtype)
        return d_x, d_w, None, None, None, None, None


def _token_grads(loss_fn, logprobs, entropy, shape, lo, hi):
    """dL/dlogprob and dL/dentropy (or None where unused) of tokens lo:hi, each [hi - lo].

    `policy_loss` is a sum over tokens of terms that depend on token t only through its own
    log-prob and entropy; its normalisers (token / sequence counts, row lengths) come from the
    mask and the arguments. So the gradient at t, given the values of tokens lo:hi, does not
    depend on the other tokens' values (zeros or earlier chunks' here): running `policy_loss` on
    the whole `[B, S]` batch with ordinary autograd yields exactly the reference's per-token
    gradient for the chunk. It has no vocab dimension, so a call per chunk is cheap.
    Not so with GSPO's sequence ratio, whose token gradients couple a sequence's tokens: that case
    calls this once, with every token's values (`_EagerHiddenLoss`, `coupled`).
    """
    # Identity hooks shadow any the caller installed (offloading, the tests' byte counting): this
    # graph lives only inside this function and is not part of what is saved for backward.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        lp = logprobs.view(shape).detach().requires_grad_()
        ent = entropy.view(shape).detach().requires_grad_()
        loss, _ = loss_fn(lp, ent)
        g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    if g_lp is None:  # cannot happen with policy_loss (the pg term uses log-probs); be safe
        g_lp = torch.zeros_like(lp)
    return g_lp.reshape(-1)[lo:hi], (None if g_ent is None else g_ent.reshape(-1)[lo:hi])


def _accumulate_grads(d_logits, x, weight, lo, hi, d_x, d_w) -> None:
    """d_hidden[lo:hi] = d_logits @ W (matmul 2), d_W += d_logits.T @ hidden[lo:hi] (matmul 3)."""
    if d_x is not None:
        torch.mm(d_logits, weight, out=d_x[lo:hi])
    if d_w is not None:
        if d_w.dtype == d_logits.dtype:
            d_w.addmm_(d_logits.t(), x[lo:hi])
        else:
            d_w.add_(d_logits.t() @ x[lo:hi])


class _EagerHiddenLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V/TP, H], local targets [N]) -> (loss, logprobs [N], entropy [N]).

    Gradients are computed eagerly in forward (module docstring): per chunk, logits (matmul 1),
    statistics, per-token upstream gradients from `policy_loss`, `d_logits`, then
    `d_hidden[c] = d_logits @ W` (matmul 2) and `d_W += d_logits.T @ hidden[c]` (matmul 3).
    Saved for backward: d_hidden `[N, H]` and d_W `[V/TP, H]`; backward only scales them by the
    upstream gradient of the loss. The log-probs and entropy outputs are not differentiable.

    `coupled` (GSPO's sequence-level ratio): a token's gradient needs its whole sequence's
    log-probs, which later chunks may hold, so the statistics of every chunk come first (pass 1,
    `_forward_chunks`), then the per-token gradients of the whole batch, then each chunk's logits
    again for d_logits (pass 2): four vocab-sized matmuls instead of three, the same live memory.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        local_targets,
        shape,
        loss_fn,
        metrics_out,
        temperature,
        chunk_tokens,
        group,
        tp_size,
        need_x,
        need_w,
        coupled,
    ):
        n = x.shape[0]
        out_dtype = torch.promote_types(x.dtype, torch.float32)
        d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        # fp32 accumulator across chunks (module docstring); fp32 weights accumulate in place.
        d_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        if coupled:
            # A token's gradient depends on the other tokens of its sequence (GSPO's sequence ratio):
            # pass 1 finishes every token's statistics, then the per-token gradients of the whole
            # batch, then pass 2 recomputes each chunk's logits for d_logits (one matmul more).
            logprobs, entropy, lse = _forward_chunks(
                x, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy=True
            )
            assert entropy is not None
            g_lp_all, g_ent_all = _token_grads(loss_fn, logprobs, entropy, shape, 0, n)
            for lo in range(0, n, chunk_tokens):
                hi = min(lo + chunk_tokens, n)
                logits = x[lo:hi] @ weight.t()  # [c, V/TP], matmul 1 again
                d_logits = _chunk_dlogits(
                    logits,
                    local_targets[lo:hi],
                    lse[lo:hi],
                    entropy[lo:hi],
                    g_lp_all[lo:hi],
                    None if g_ent_all is None else g_ent_all[lo:hi],
                    temperature,
                    True,
                )
                del logits
                _accumulate_grads(d_logits, x, weight, lo, hi, d_x, d_w)
        else:
            # Zeros, not empty: tokens of later chunks enter `policy_loss` in _token_grads.
            logprobs = torch.zeros(n, dtype=out_dtype, device=x.device)
            entropy = torch.zeros_like(logprobs)
            for lo in range(0, n, chunk_tokens):
                hi = min(lo + chunk_tokens, n)
                targets_c = local_targets[lo:hi]
                logits = x[lo:hi] @ weight.t()  # [c, V/TP], matmul 1
                # owned=False: the logits are needed again for d_logits below.
                stats = _chunk_stats(logits, targets_c, temperature, False, True)
                lp, ent, lse = _combine(*stats, group, tp_size)
                del stats
                logprobs[lo:hi] = lp
                entropy[lo:hi] = ent
                g_lp, g_ent = _token_grads(loss_fn, logprobs, entropy, shape, lo, hi)
                d_logits = _chunk_dlogits(logits, targets_c, lse, ent, g_lp, g_ent, temperature, True)
                del logits
                _accumulate_grads(d_logits, x, weight, lo, hi, d_x, d_w)
        if d_w is not None:
            d_w = d_w.to(weight.dtype)
        # Loss and metrics of the whole batch, exactly as the reference computes them.
        loss, metrics = loss_fn(logprobs.view(shape), entropy.view(shape))
        metrics_out.update(metrics)
        ctx.save_for_backward(d_x, d_w)
        ctx.mark_non_differentiable(logprobs, entropy)
        return loss, logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_lp, _g_ent):
        if getattr(ctx, "done", False):
            raise RuntimeError(
                "fused_policy_loss_from_hidden supports one backward per forward (no retain_graph): "
                "its gradients are computed in forward and scaled in place in backward"
            )
        ctx.done = True
        d_x, d_w = ctx.saved_tensors
        # In place, so that backward allocates no second weight-sized tensor: these buffers
        # exist only for this backward, which is why it may run only once.
        if d_x is not None:
            d_x.mul_(g_loss)
        if d_w is not None:
            d_w.mul_(g_loss)
        return d_x, d_w, None, None, None, None, None, None, None, None, None, None, None


def _prepare(x, weight, targets, temperature, chunk_tokens, tp_group):
    """Validate, resolve the TP group, flatten: (x [N, D], local targets [N], group, tp_size)."""
    _check_op_inputs(x, weight, targets, temperature, chunk_tokens)
    group, tp_rank, tp_size = resolve_tp_group(tp_group)
    if weight is not None and x.dtype != weight.dtype:
        # Megatron's Float16Module hands the last stage's output back in fp32; the output
        # layer ran in the weight dtype, and so does this (bf16 -> fp32 -> bf16 is exact).
        x = x.to(weight.dtype)
    v_local = weight.shape[0] if weight is not None else x.shape[-1]
    local_targets = _local_targets(targets.reshape(-1), v_local, tp_rank)
    return x.reshape(-1, x.shape[-1]), local_targets, group, tp_size


def _logprobs_entropy(
    x: torch.Tensor,  # [..., H] with weight, or [..., V/TP] logits
    weight: torch.Tensor | None,  # [V/TP, H]
    targets: torch.Tensor,  # [...]
    temperature: float,
    chunk_tokens: int,
    tp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # [...], [...] differentiable
    x2d, local_targets, group, tp_size = _prepare(x, weight, targets, temperature, chunk_tokens, tp_group)
    lp, ent = _LogprobsEntropy.apply(x2d, weight, local_targets, temperature, chunk_tokens, group, tp_size)
    return lp.view(targets.shape), ent.view(targets.shape)


def _check_op_inputs(x, weight, targets, temperature, chunk_tokens) -> None:
    if x.ndim < 2 or x.shape[:-1] != targets.shape:
        raise ValueError(
            f"expected x [..., D] and targets [...] with the same leading shape, "
            f"got {tuple(x.shape)} and {tuple(targets.shape)}"
        )
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if weight is not None and (weight.ndim != 2 or weight.shape[1] != x.shape[-1]):
        raise ValueError(f"weight must be [V/TP, H] with H = hidden size {x.shape[-1]}, got {tuple(weight.shape)}")
    if not chunk_tokens >= 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# ---------------------------------------------------------------------------------------------
# public API


def fused_policy_loss_from_hidden(
    hidden: torch.Tensor,  # [B, S, H] final hidden states (after the final norm), TP-replicated
    weight: torch.Tensor,  # [V/TP, H] this rank's rows of the output layer
    targets: torch.Tensor,  # [B, S] global token ids
    old_logprobs: torch.Tensor | None,  # [B, S]; None = on-policy (policy_loss)
    advantages: torch.Tensor,  # [B] or [B, S]
    mask: torch.Tensor,  # [B, S], nonzero = response token that counts
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,  # [B, S]
    rollout_logprobs: torch.Tensor | None = None,  # [B, S]
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    kl_coef: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    global_num_tokens: GlobalCount | None = None,
    global_num_seqs: GlobalCount | None = None,
    seq_ids: torch.Tensor | None = None,  # [B, S] packed batches: sequence of each token
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, Metrics, torch.Tensor, torch.Tensor]:  # loss, metrics, [B, S], [B, S]
    """`policy_loss` of `log_softmax(hidden @ weight.T / T)` without forming the logits.

    Returns `(loss, metrics, logprobs, entropy)`: the loss and metrics are `policy_loss`'s
    (`metrics["entropy"]` included), logprobs and entropy are fp32 `[B, S]` and detached: the
    gradients are computed eagerly in forward (module docstring), so only the loss is
    differentiable, once (no `retain_graph`); `fused_policy_loss_from_logits` returns
    differentiable ones. Three vocab-sized matmuls, like the plain path; saved for backward:
    d_hidden `[B * S, H]` and d_weight `[V/TP, H]`. With `cfg.ratio_level="sequence"` (GSPO) the
    logits of each chunk are computed twice (four matmuls; `_EagerHiddenLoss`).
    Rows of the `[B, S]` tensors are the sequences of the seq-mean-* modes, as in `policy_loss`.

    Gradients reach `hidden` (this rank's partial sum over its vocab slice: wrap `hidden` in
    `copy_to_tp_region`, or get it from `capture_lm_head_input`, so that TP ranks sum them) and
    `weight` (this rank's shard, complete). The other arguments are `policy_loss`'s;
    `chunk_tokens` bounds the vocab-sized temporaries to about 3 x `[chunk_tokens, V/TP]` fp32.
    `tp_group`: None = Megatron's TP group (a single rank when Megatron is not initialized).
    """

    def loss_fn(lp: torch.Tensor, ent: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        # On-policy (None): policy_loss takes lp.detach(), the values of this very call, which per
        # chunk in _token_grads are the chunk's own (a token's gradient sees only its own old value).
        return policy_loss(
            lp,
            old_logprobs,
            advantages,
            mask,
            cfg,
            ref_logprobs=ref_logprobs,
            entropy=ent,
            rollout_logprobs=rollout_logprobs,
            kl_coef=kl_coef,
            eps_low=eps_low,
            eps_high=eps_high,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            seq_ids=seq_ids,
        )

    x2d, local_targets, group, tp_size = _prepare(hidden, weight, targets, temperature, chunk_tokens, tp_group)
    need_x = torch.is_grad_enabled() and x2d.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if not (need_x or need_w):
        with torch.no_grad():
            lp, ent, _ = _forward_chunks(x2d, weight, local_targets, temperature, chunk_tokens, group, tp_size, True)
            loss, metrics = loss_fn(lp.view(targets.shape), ent.view(targets.shape))
        return loss, metrics, lp.view(targets.shape), ent.view(targets.shape)
    metrics: Metrics = {}
    loss, lp, ent = _EagerHiddenLoss.apply(
        x2d,
        weight,
        local_targets,
        targets.shape,
        loss_fn,
        metrics,
        temperature,
        chunk_tokens,
        group,
        tp_size,
        need_x,
        need_w,
        cfg.ratio_level == "sequence",
    )
    return loss, metrics, lp.view(targets.shape), ent.view(targets.shape)


def fused_policy_loss_from_logits(
    logits: torch.Tensor,  # [B, S, V/TP] this rank's vocab slice
    targets: torch.Tensor,  # [B, S]
    old_logprobs: torch.Tensor | None,  # [B, S]; None = on-policy (policy_loss)
    advantages: torch.Tensor,  # [B] or [B, S]
    mask: torch.Tensor,  # [B, S]
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    kl_coef: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    global_num_tokens: GlobalCount | None = None,
    global_num_seqs: GlobalCount | None = None,
    seq_ids: torch.Tensor | None = None,  # [B, S] packed batches: sequence of each token
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, Metrics, torch.Tensor, torch.Tensor]:
    """`fused_policy_loss_from_hidden` for callers that already have the logits (e.g. the
    model's own output layer). Saves only the logits themselves (which exist anyway) and `[N]`
    vectors for backward, instead of fp32 copies of them."""
    logprobs, entropy = _logprobs_entropy(logits, None, targets, temperature, chunk_tokens, tp_group)
    loss, metrics = policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        cfg,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        rollout_logprobs=rollout_logprobs,
        kl_coef=kl_coef,
        eps_low=eps_low,
        eps_high=eps_high,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        seq_ids=seq_ids,
    )
    return loss, metrics, logprobs, entropy


@torch.no_grad()
def fused_logprobs_entropy(
    x: torch.Tensor,  # [..., H] hidden states when `weight` is given, else [..., V/TP] logits
    targets: torch.Tensor,  # [...] global token ids
    *,
    weight: torch.Tensor | None = None,  # [V/TP, H]
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [...], [...] or None; fp32
    """Forward-only log p(target) and entropy (old / reference log-probs): chunked, no grad."""
    x2d, local_targets, group, tp_size = _prepare(x, weight, targets, temperature, chunk_tokens, tp_group)
    lp, ent, _ = _forward_chunks(x2d, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy)
    return lp.view(targets.shape), (ent.view(targets.shape) if ent is not None else None)
