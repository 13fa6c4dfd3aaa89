"""The Triton kernels of ops/triton_fused_loss.py against fp64 PyTorch, and the fused loss on
CUDA (which dispatches to them) against its CPU path and the plain reference.

GPU status: docs/gpu-status.md. The GPU tests skip without CUDA + Triton; run them with
`pytest -m gpu tests/ops/test_triton_fused_loss.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.ops import triton_fused_loss
from agpo_megatron.ops.fused_loss import fused_policy_loss_from_hidden

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_fused_loss.HAVE_TRITON), reason="needs CUDA and Triton"
)


def test_module_imports_and_flags_triton():
    # On CPU machines without Triton the import must still succeed (the fused op imports it).
    assert triton_fused_loss.HAVE_TRITON == (importlib.util.find_spec("triton") is not None)


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:  # [rows, V] on CUDA
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = 3.0 * torch.randn(rows, vocab, device="cuda", generator=g) + 20.0  # an offset tests the max shift
    x[0, -1] += 30.0  # the max in the last block: the running max moves late (rescaling path)
    x[1, 0] += 30.0  # ... and in the first block
    return x.to(dtype)


def _local_targets(rows: int, vocab: int, seed: int = 1) -> torch.Tensor:  # [rows], -1 = other rank
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    t[::4] = -1
    t[2] = vocab - 1  # last column, the masked tail of the last block
    return t


def _tol(dtype: torch.dtype) -> float:
    # fp32: the kernel forms z - lse from an fp32 z ~ 100 (ulp ~ 8e-6), so p is good to ~1e-5
    # relative. bf16: the output itself is rounded to 8 mantissa bits.
    return 1e-2 if dtype == torch.bfloat16 else 1e-4


def assert_close(actual, expected, rel, msg=""):
    scale = expected.abs().max().clamp(min=1e-12).item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rel * scale, msg=msg)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab", [1000, 5003, 9000])  # one block, two, three (BLOCK = 4096)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_stats_match_fp64(dtype, vocab, temperature):
    rows = 37
    logits = _logits(rows, vocab, dtype)
    t = _local_targets(rows, vocab)
    m, s, w, z_t = triton_fused_loss.chunk_stats(logits, t, temperature)

    z = logits.double() / temperature  # the kernel sees the same rounded inputs
    m_ref = z.amax(dim=-1)
    e = (z - m_ref[:, None]).exp()
    s_ref = e.sum(-1)
    w_ref = (e * (z - m_ref[:, None])).sum(-1)
    zt_ref = torch.where(t >= 0, z.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    # The statistics are fp32 sums over fp32-converted inputs: tight for both input dtypes.
    assert_close(m, m_ref, 1e-6, "max")
    assert_close(s, s_ref, 1e-5, "sum exp")
    assert_close(w, w_ref, 1e-5, "sum p z")
    assert_close(z_t, zt_ref, 1e-6, "target logit")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("with_entropy_grad", [True, False])
@pytest.mark.parametrize("vocab", [1000, 9000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_dlogits_match_autograd(dtype, vocab, with_entropy_grad):
    rows, temperature = 37, 0.7
    logits = _logits(rows, vocab, dtype)
    t = _local_targets(rows, vocab)
    g = torch.Generator(device="cuda").manual_seed(2)
    g_lp = torch.randn(rows, device="cuda", generator=g)
    g_ent = torch.randn(rows, device="cuda", generator=g) if with_entropy_grad else None

    # fp64 autograd: log p(t) where the target is in this slice, else the -lse part alone,
    # which is what this rank's share of d log p(t) / dz is at TP > 1.
    z = (logits.double() / temperature).requires_grad_()
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    in_slice = t >= 0
    lp = torch.where(in_slice, z.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0) - lse
    ent = -(logp.exp() * logp).sum(-1)
    objective = (g_lp.double() * lp).sum()
    if g_ent is not None:
        objective = objective + (g_ent.double() * ent).sum()
    (dz,) = torch.autograd.grad(objective, z)
    expected = dz / temperature  # chain rule through z = logits / T

    out = triton_fused_loss.chunk_dlogits(
        logits, t, lse.detach().float(), ent.detach().float(), g_lp, g_ent, temperature
    )
    assert out.dtype == dtype and out.shape == logits.shape
    assert_close(out, expected, _tol(dtype), "d_logits")


def _problem(dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    b, s, h, v = 3, 40, 128, 6000  # 120 tokens; chunk_tokens=32 leaves a 24-token tail
    hidden = torch.randn(b, s, h, generator=g)
    weight = 0.2 * torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (b, s), generator=g)
    mask = torch.arange(s) < torch.tensor([40, 25, 7])[:, None]
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = lp + 0.5 * torch.randn(b, s, generator=g)
    tensors = dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        targets=targets,
        mask=mask,
        old=old,
        adv=torch.randn(b, generator=g),
        ref=lp + 0.3 * torch.randn(b, s, generator=g),
    )
    return {k: x.to(device) for k, x in tensors.items()}


CFG = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, dual_clip_c=3.0, agg_mode="seq-mean-token-mean")


def _fused(p, temperature):
    hidden, weight = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss, _, lp, ent = fused_policy_loss_from_hidden(
        hidden,
        weight,
        p["targets"],
        p["old"],
        p["adv"],
        p["mask"],
        CFG,
        ref_logprobs=p["ref"],
        temperature=temperature,
        chunk_tokens=32,
    )
    loss.backward()
    return dict(loss=loss.detach(), lp=lp.detach(), ent=ent.detach(), d_hidden=hidden.grad, d_weight=weight.grad)


def _reference(p, temperature):
    hidden, weight = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    lp = logp.gather(-1, p["targets"][..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    loss, _ = policy_loss(lp, p["old"], p["adv"], p["mask"], CFG, ref_logprobs=p["ref"], entropy=ent)
    loss.backward()
    return dict(loss=loss.detach(), lp=lp.detach(), ent=ent.detach(), d_hidden=hidden.grad, d_weight=weight.grad)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_matches_reference_and_cpu_path(dtype):
    temperature = 0.8
    p = _problem(dtype, "cuda")
    fused = _fused(p, temperature)
    ref = _reference(p, temperature)
    # cuBLAS may pick another algorithm for a 32-row chunk than for all 120 rows, so logits can
    # differ in the last bit: ~1e-7 relative in fp32, but one bf16 ulp (0.4%) of a logit moves
    # log p by up to ~0.03. A wrong formula shows up as O(1) errors, far above these bounds.
    value_tol, grad_tol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    for key in ("loss", "lp", "ent"):
        assert_close(fused[key], ref[key], value_tol, key)
    for key in ("d_hidden", "d_weight"):
        assert ref[key].abs().max() > 0
        assert_close(fused[key].float(), ref[key].float(), grad_tol, key)
    if dtype == torch.float32:
        cpu = _fused(_problem(dtype, "cpu"), temperature)  # the PyTorch chunk functions
        for key, value in cpu.items():
            assert_close(fused[key].cpu(), value, 1e-4, f"cuda vs cpu {key}")
