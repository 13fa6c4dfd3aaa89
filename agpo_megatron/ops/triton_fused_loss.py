"""Triton kernels for the per-chunk part of `ops/fused_loss.py` (CUDA only).

Two kernels, one program per token row, each streaming the row's `V/TP` logits in blocks:

* `chunk_stats`: the four per-rank statistics of `fused_chunks.chunk_stats_torch` in one read of the row,
  with an online (rescaled) max: `m = max z`, `s = sum exp(z - m)`,
  `w = sum exp(z - m)(z - m)`, and `z_target` (0 when the target is on another rank). When the
  running max moves from `m` to `m'`, the partial sums are carried over with
  `s' = e^(m - m') s` and `w' = e^(m - m') (w + (m - m') s)`, the same rule the TP combine in
  `fused_chunks.combine` uses across ranks.
* `chunk_dlogits`: `dL/dlogits = (g_lp (1[v = t] - p_v) - g_H p_v (log p_v + H)) / T` from the
  saved per-token log-sum-exp and entropy, written in the logits' dtype.

The PyTorch versions in `fused_loss.py` are the reference; `tests/ops/test_triton_fused_loss.py`
checks these against them and against autograd.

GPU status: docs/gpu-status.md. The kernels have been run in Triton's interpreter
(`TRITON_INTERPRET=1`, triton 3.9.0, CPU tensors) against the PyTorch chunk functions and fp64
autograd: statistics within 1.3e-6 and fp32 `d_logits` within 8e-6 of the largest entry, and the
whole fused loss through the kernels within 1e-7 of its PyTorch path. That checks the arithmetic
and the masking, not GPU code generation or speed; the GPU parity tests
(`pytest -m gpu tests/ops/test_triton_fused_loss.py`) skip without CUDA. `fused_loss` uses the
kernels only for CUDA tensors (fp16 / bf16 / fp32).

Importing this module never fails: without Triton `HAVE_TRITON` is False and the fused op keeps
its PyTorch path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: the fused op falls back to its PyTorch chunk functions
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "chunk_stats", "chunk_dlogits"]

_MAX_BLOCK = 4096


if HAVE_TRITON:

    @triton.jit
    def _stats_kernel(
        logits_ptr,
        targets_ptr,
        m_ptr,
        s_ptr,
        w_ptr,
        zt_ptr,
        row_stride,
        n_cols,
        temperature,
        BLOCK: tl.constexpr,
    ):
        # int64: chunk_tokens * V/TP can exceed 2^31 elements.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        m = float("-inf")
        s = 0.0
        w = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = m - m_new  # -inf on the first block, where s = w = 0
            alpha = tl.exp(shift)
            e = tl.where(valid, tl.exp(z - m_new), 0.0)
            d = tl.where(valid, z - m_new, 0.0)  # masked lanes hold -inf; -inf * 0 would be NaN
            # On the first block shift = -inf and s = 0: select before multiplying (-inf * 0 = NaN).
            w = alpha * (w + tl.where(s > 0.0, shift, 0.0) * s) + tl.sum(e * d, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new
        t = tl.load(targets_ptr + row)
        in_slice = t >= 0
        z_t = tl.load(base + tl.where(in_slice, t, 0)).to(tl.float32) / temperature
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(w_ptr + row, w)
        tl.store(zt_ptr + row, tl.where(in_slice, z_t, 0.0))

    @triton.jit
    def _dlogits_kernel(
        logits_ptr,
        targets_ptr,
        lse_ptr,
        ent_ptr,
        glp_ptr,
        gent_ptr,
        out_ptr,
        row_stride,
        out_row_stride,
        n_cols,
        temperature,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        out_base = out_ptr + row * out_row_stride
        t = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        ent = tl.load(ent_ptr + row)
        g_lp = tl.load(glp_ptr + row)
        g_ent = tl.load(gent_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < n_cols
            z = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) / temperature
            log_p = z - lse
            p = tl.exp(log_p)
            dz = -p * (g_lp + g_ent * (log_p + ent))
            dz = tl.where(cols == t, dz + g_lp, dz)  # t = -1 (other rank) matches no column
            tl.store(out_base + cols, (dz / temperature).to(out_ptr.dtype.element_ty), mask=valid)


def _launch_config(n_cols: int) -> tuple[int, int]:  # (BLOCK, num_warps)
    block = min(_MAX_BLOCK, triton.next_power_of_2(n_cols))
    return block, 8 if block >= 2048 else 4


def _rows(logits: torch.Tensor) -> torch.Tensor:  # [c, V/TP] with unit column stride
    if logits.ndim != 2:
        raise ValueError(f"expected [c, V/TP] logits, got shape {tuple(logits.shape)}")
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _vec(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:  # [c] fp32, contiguous
    # Upstream gradients may be expanded (stride 0); the kernels index them densely.
    if x is None:
        return torch.zeros(like.shape[0], dtype=torch.float32, device=like.device)
    return x.float().contiguous()


def chunk_stats(
    logits: torch.Tensor,  # [c, V/TP] fp32 / bf16 / fp16 on CUDA
    local_targets: torch.Tensor,  # [c] int64, -1 = target not in this rank's slice
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # m, s, w, z_t: [c] fp32
    """Per-rank softmax statistics of `logits / temperature` (see `fused_chunks.chunk_stats_torch`)."""
    logits = _rows(logits)
    c, v = logits.shape
    m, s, w, z_t = (torch.empty(c, dtype=torch.float32, device=logits.device) for _ in range(4))
    if c == 0:
        return m, s, w, z_t
    block, warps = _launch_config(v)
    _stats_kernel[(c,)](
        logits,
        local_targets.long().contiguous(),
        m,
        s,
        w,
        z_t,
        logits.stride(0),
        v,
        float(temperature),
        BLOCK=block,
        num_warps=warps,
    )
    return m, s, w, z_t


def chunk_dlogits(
    logits: torch.Tensor,  # [c, V/TP]
    local_targets: torch.Tensor,  # [c] int64, -1 = not in this slice
    lse: torch.Tensor,  # [c] global log-sum-exp of logits / T
    entropy: torch.Tensor,  # [c]
    g_lp: torch.Tensor | None,  # [c] dL/dlogprob, None = 0
    g_ent: torch.Tensor | None,  # [c] dL/dentropy, None = 0
    temperature: float,
) -> torch.Tensor:  # [c, V/TP] in logits.dtype
    """dL/dlogits of one chunk (see `fused_chunks.chunk_dlogits_torch`)."""
    logits = _rows(logits)
    c, v = logits.shape
    out = torch.empty((c, v), dtype=logits.dtype, device=logits.device)
    if c == 0:
        return out
    block, warps = _launch_config(v)
    _dlogits_kernel[(c,)](
        logits,
        local_targets.long().contiguous(),
        _vec(lse, logits),
        _vec(entropy, logits),
        _vec(g_lp, logits),
        _vec(g_ent, logits),
        out,
        logits.stride(0),
        out.stride(0),
        v,
        float(temperature),
        BLOCK=block,
        num_warps=warps,
    )
    return out
