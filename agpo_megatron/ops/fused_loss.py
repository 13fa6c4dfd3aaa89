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

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import GlobalCount, Metrics, PolicyLossConfig, policy_loss
from agpo_megatron.ops import fused_chunks as fc
from agpo_megatron.runtime.parallel import resolve_tp_group

__all__ = [
    "fused_policy_loss_from_hidden",
    "fused_policy_loss_from_logits",
    "fused_logprobs_entropy",
]


class _LogprobsEntropy(torch.autograd.Function):
    """(x [N, D], weight [V/TP, H] or None, local targets [N]) -> (logprobs [N], entropy [N]).

    x is hidden states (D = H) when weight is given, else logits (D = V/TP).
    """

    @staticmethod
    def forward(ctx, x, weight, local_targets, temperature, chunk_tokens, group, tp_size):
        logprobs, entropy, lse = fc.forward_chunks(
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
            logits = fc.chunk_logits(x, weight, lo, hi)
            d_logits = fc.chunk_dlogits(
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
    `fused_chunks.forward_chunks`), then the per-token gradients of the whole batch, then each chunk's logits
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
            logprobs, entropy, lse = fc.forward_chunks(
                x, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy=True
            )
            assert entropy is not None
            g_lp_all, g_ent_all = _token_grads(loss_fn, logprobs, entropy, shape, 0, n)
            for lo in range(0, n, chunk_tokens):
                hi = min(lo + chunk_tokens, n)
                logits = x[lo:hi] @ weight.t()  # [c, V/TP], matmul 1 again
                d_logits = fc.chunk_dlogits(
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
                stats = fc.chunk_stats(logits, targets_c, temperature, False, True)
                lp, ent, lse = fc.combine(*stats, group, tp_size)
                del stats
                logprobs[lo:hi] = lp
                entropy[lo:hi] = ent
                g_lp, g_ent = _token_grads(loss_fn, logprobs, entropy, shape, lo, hi)
                d_logits = fc.chunk_dlogits(logits, targets_c, lse, ent, g_lp, g_ent, temperature, True)
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
    local_targets = fc.local_targets(targets.reshape(-1), v_local, tp_rank)
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
            lp, ent, _ = fc.forward_chunks(x2d, weight, local_targets, temperature, chunk_tokens, group, tp_size, True)
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
    lp, ent, _ = fc.forward_chunks(x2d, weight, local_targets, temperature, chunk_tokens, group, tp_size, with_entropy)
    return lp.view(targets.shape), (ent.view(targets.shape) if ent is not None else None)
