"""The fused policy loss (ops/fused_loss.py) against the plain path.

In-process, TP=1 without a process group: fp64 finite-difference checks of the hand-written
backward (the eager one of the hidden-states variant, the recomputing one of the logits
variant), what is saved for backward, the upstream gradient scaling, the forward-only op, an
all-masked batch, input checks.

Through one 2-rank torchrun worker (tests/workers/fused_loss_tp.py): every case of its CASES
table at TP=1 and TP=2, from hidden states and from logits, against the oracle
`vocab_parallel_logprobs` -> `policy_loss` on materialised logits; TP=2 against TP=1; and
`capture_lm_head_input` (models/lm_head.py) on a tiny GPTModel (logits, loss and every
parameter's gradient).

Tolerances are relative to the largest reference entry. fp32: 1e-5 (measured <= 5e-7).
bf16 inputs: the log-probs, entropy, loss and metrics are fp32 statistics of the same bf16
logits, so 1e-5 still holds; gradients get 2e-2, about five bf16 ulps (measured <= 5e-3): the
fused op rounds each chunk's weight-gradient product to bf16 once before its fp32
accumulation, the reference rounds one matmul over all tokens, and at TP=2 the d_hidden
all-reduce runs in bf16.
"""

from __future__ import annotations

import pytest
import torch

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.models.lm_head import capture_lm_head_input
from agpo_megatron.ops.fused_loss import (
    fused_logprobs_entropy,
    fused_policy_loss_from_hidden,
    fused_policy_loss_from_logits,
)
from tests.dist import torchrun
from tests.workers.fused_loss_tp import CASES

CFG = PolicyLossConfig(
    kl_coef=0.1, entropy_coef=0.05, dual_clip_c=1.5, tis_cap=1.5, agg_mode="seq-mean-token-mean", eps_high=0.28
)


def assert_close(actual, expected, rel, msg=""):
    scale = expected.detach().abs().max().clamp(min=1e-12)
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale.item(), msg=msg)


def problem(b=2, s=5, h=6, v=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 3:] = False
    lp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    noise = torch.randn(3, b, s, generator=g, dtype=dtype)
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        old=lp + 0.8 * noise[0],
        ref=lp + 0.3 * noise[1],
        rollout=lp + 0.8 * noise[0] + 0.3 * noise[2],
        adv=torch.randn(b, generator=g, dtype=dtype),
    )


def loss_args(p):
    """(positional, keyword) arguments of the fused loss after its input and weight."""
    args = (p["targets"], p["old"], p["adv"], p["mask"], CFG)
    return args, dict(ref_logprobs=p["ref"], rollout_logprobs=p["rollout"])


# --------------------------------------------------------------------------------------------
# in-process, TP=1


def test_backward_matches_finite_differences_fp64_logits():
    # Every term is on (KL, entropy, dual clip, TIS), so both g_lp and g_H reach the hand-written
    # vocab backward; chunk_tokens=3 does not divide the 10 tokens.
    p = problem()
    args, kw = loss_args(p)

    def fn(z):
        loss, _, lp, ent = fused_policy_loss_from_logits(z, *args, temperature=0.7, chunk_tokens=3, **kw)
        return loss, lp, ent

    assert torch.autograd.gradcheck(fn, ((p["hidden"] @ p["weight"].T).requires_grad_(),))


def test_backward_matches_finite_differences_fp64_hidden():
    # The eager backward runs once per forward (gradcheck calls it twice), so central differences
    # by hand; same problem as above, and both inputs get their gradient from one backward.
    p = problem()
    args, kw = loss_args(p)

    def loss_of(h, w):
        loss, _, lp, ent = fused_policy_loss_from_hidden(h, w, *args, temperature=0.7, chunk_tokens=3, **kw)
        return loss, lp, ent

    hidden, weight = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss, lp, ent = loss_of(hidden, weight)
    assert not lp.requires_grad and not ent.requires_grad  # only the loss is differentiable
    (0.7 * loss).backward()  # a non-unit upstream gradient
    loss2 = loss_of(p["hidden"].clone().requires_grad_(), weight.detach())[0]
    loss2.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss2.backward()
    eps = 1e-6
    for x, grad in ((p["hidden"], hidden.grad), (p["weight"], weight.grad)):
        numeric = torch.empty_like(x)
        for i in range(x.numel()):
            with torch.no_grad():
                plus, minus = x.clone(), x.clone()
                plus.view(-1)[i] += eps
                minus.view(-1)[i] -= eps
                args_plus = (plus, p["weight"]) if x is p["hidden"] else (p["hidden"], plus)
                args_minus = (minus, p["weight"]) if x is p["hidden"] else (p["hidden"], minus)
                numeric.view(-1)[i] = 0.7 * (loss_of(*args_plus)[0] - loss_of(*args_minus)[0]) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


def _saved_bytes(fn) -> tuple[int, list[torch.Tensor]]:
    """(unique storage bytes, tensors) of everything autograd saves while `fn` runs, and its output."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values()), saved, out


def test_saves_only_the_eager_gradients_for_backward():
    p = problem(b=4, s=16, h=32, v=1000, dtype=torch.float32)
    n, h, v = 64, 32, 1000
    args, kw = loss_args(p)
    hidden, weight = p["hidden"].requires_grad_(), p["weight"].requires_grad_()
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}

    def fused():
        return fused_policy_loss_from_hidden(hidden, weight, *args, chunk_tokens=16, **kw)[0]

    def reference():
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        lp = logp.gather(-1, p["targets"][..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return policy_loss(lp, p["old"], p["adv"], p["mask"], CFG, entropy=ent, **kw)[0]

    total, saved, loss = _saved_bytes(fused)
    # Gradients are computed in forward: exactly d_hidden [N, H] and d_weight [V, H] are saved,
    # neither the inputs nor anything vocab-by-token sized.
    assert not inputs & {t.untyped_storage().data_ptr() for t in saved}
    assert sorted(tuple(t.shape) for t in saved) == [(n, h), (v, h)]
    assert total == (n * h + v * h) * 4
    ref_bytes, _, ref_loss = _saved_bytes(reference)
    assert ref_bytes >= 2 * n * v * 4  # the measurement does see the vocab-sized tensors
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_forward_only_op_equals_the_differentiable_one():
    p = problem(dtype=torch.float32)
    args, kw = loss_args(p)
    _, _, lp, ent = fused_policy_loss_from_hidden(p["hidden"], p["weight"], *args, temperature=0.7, **kw)
    logits = p["hidden"] @ p["weight"].T
    for x, w in ((p["hidden"], p["weight"]), (logits, None)):
        f_lp, f_ent = fused_logprobs_entropy(x, p["targets"], weight=w, temperature=0.7, chunk_tokens=3)
        torch.testing.assert_close(f_lp, lp.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(f_ent, ent.detach(), rtol=0, atol=1e-6)
        assert f_lp.grad_fn is None
    lp_only, none = fused_logprobs_entropy(logits, p["targets"], temperature=0.7, with_entropy=False)
    assert none is None
    torch.testing.assert_close(lp_only, lp.detach(), rtol=0, atol=1e-6)


def test_eager_gradients_scale_with_the_upstream_gradient_and_match_the_reference():
    p = problem(dtype=torch.float32)
    args, kw = loss_args(p)
    hidden, weight = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    loss, metrics, _, _ = fused_policy_loss_from_hidden(hidden, weight, *args, temperature=0.7, chunk_tokens=4, **kw)
    (-3.0 * loss).backward()
    h_ref, w_ref = p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_()
    logp = torch.log_softmax(h_ref @ w_ref.T / 0.7, dim=-1)
    lp = logp.gather(-1, p["targets"][..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ref_loss, ref_metrics = policy_loss(lp, p["old"], p["adv"], p["mask"], CFG, entropy=ent, **kw)
    (-3.0 * ref_loss).backward()
    assert_close(loss, ref_loss, 1e-5)
    assert set(metrics) == set(ref_metrics)
    for key, value in ref_metrics.items():
        assert_close(metrics[key], value, 1e-5, key)
    assert_close(hidden.grad, h_ref.grad, 1e-5, "d_hidden")
    assert_close(weight.grad, w_ref.grad, 1e-5, "d_weight")
    # Only one input needing a gradient: the other is neither computed nor returned.
    h_only = p["hidden"].clone().requires_grad_()
    h_loss = fused_policy_loss_from_hidden(h_only, p["weight"], *args, temperature=0.7, chunk_tokens=4, **kw)[0]
    (-3.0 * h_loss).backward()
    assert_close(h_only.grad, h_ref.grad, 1e-5, "d_hidden alone")
    # Without gradients the op is forward-only and returns the same loss.
    with torch.no_grad():
        nograd = fused_policy_loss_from_hidden(hidden, weight, *args, temperature=0.7, chunk_tokens=4, **kw)[0]
    assert nograd.grad_fn is None
    torch.testing.assert_close(nograd, loss.detach(), rtol=0, atol=1e-6)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    p = problem(dtype=torch.float32)
    p["mask"] = torch.zeros_like(p["mask"])
    p["old"] = torch.full_like(p["old"], float("nan"))  # padding garbage
    args, kw = loss_args(p)
    hidden, weight = p["hidden"].requires_grad_(), p["weight"].requires_grad_()
    loss, _, _, _ = fused_policy_loss_from_hidden(hidden, weight, *args, chunk_tokens=4, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_capture_changes_nothing_before_the_last_pipeline_stage():
    stage = torch.nn.Linear(2, 2)
    stage.post_process = False  # a GPTModel chunk without the output layer
    ddp = torch.nn.Module()
    ddp.module = stage  # wrappers expose the model as .module
    with capture_lm_head_input(ddp) as weight:
        assert weight is None
        assert "forward" not in vars(stage)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(targets=torch.zeros(2, 4, dtype=torch.long)), "same leading shape"),
        (dict(targets=torch.zeros(2, 5)), "integer token ids"),
        (dict(weight=torch.zeros(10, 7)), "hidden size 6"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_rejects_bad_inputs(change, match):
    p = problem(dtype=torch.float32)
    kw = dict(targets=p["targets"], weight=p["weight"], chunk_tokens=4, temperature=1.0) | change
    with pytest.raises(ValueError, match=match):
        fused_policy_loss_from_hidden(
            p["hidden"],
            kw["weight"],
            kw["targets"],
            p["old"],
            p["adv"],
            p["mask"],
            CFG,
            ref_logprobs=p["ref"],
            rollout_logprobs=p["rollout"],
            chunk_tokens=kw["chunk_tokens"],
            temperature=kw["temperature"],
        )


def test_gspo_sequence_ratio_across_chunks_matches_finite_differences_and_the_plain_path():
    """GSPO couples the tokens of a sequence; with chunks of 3 every sequence spans chunks, so a
    per-chunk gradient (tokens of later chunks still zero) would be wrong: the two-pass design."""
    p = problem()
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.05)
    args = (p["targets"], p["old"], p["adv"], p["mask"], cfg)
    kw = dict(ref_logprobs=p["ref"])

    def loss_of(h):
        return fused_policy_loss_from_hidden(h, p["weight"], *args, temperature=0.7, chunk_tokens=3, **kw)[0]

    hidden = p["hidden"].clone().requires_grad_()
    loss_of(hidden).backward()
    # The plain path: materialised logits -> log-softmax -> policy_loss, ordinary autograd.
    h_ref = p["hidden"].clone().requires_grad_()
    logp = torch.log_softmax(h_ref @ p["weight"].T / 0.7, dim=-1)
    lp = logp.gather(-1, p["targets"][..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ref_loss, _ = policy_loss(lp, p["old"], p["adv"], p["mask"], cfg, entropy=ent, **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss_of(p["hidden"]), ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-8, atol=1e-10)
    eps, i = 1e-6, 4  # one central difference, on an entry of the first sequence
    plus, minus = p["hidden"].clone(), p["hidden"].clone()
    plus.view(-1)[i] += eps
    minus.view(-1)[i] -= eps
    numeric = (loss_of(plus) - loss_of(minus)) / (2 * eps)
    torch.testing.assert_close(hidden.grad.view(-1)[i], numeric, rtol=1e-5, atol=1e-8)


def test_gspo_packed_rows_fused_equal_plain():
    """Packed rows (seq_ids): two sequences in row 0, one in row 1; fused (chunks of 4) vs plain."""
    p = problem(b=2, s=8)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1], [2, 2, 2, 2, 2, -1, -1, -1]])
    mask = seq_ids >= 0
    adv = torch.tensor([[0.5] * 3 + [-1.0] * 5, [2.0] * 8], dtype=torch.float64)
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", eps_low=0.1, eps_high=0.1)
    common = dict(seq_ids=seq_ids, global_num_seqs=3)
    hidden = p["hidden"].clone().requires_grad_()
    loss, _, _, _ = fused_policy_loss_from_hidden(
        hidden, p["weight"], p["targets"], p["old"], adv, mask, cfg, chunk_tokens=4, **common
    )
    loss.backward()
    h_ref = p["hidden"].clone().requires_grad_()
    lp = torch.log_softmax(h_ref @ p["weight"].T, dim=-1).gather(-1, p["targets"][..., None]).squeeze(-1)
    ref, _ = policy_loss(lp, p["old"], adv, mask, cfg, **common)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 2-rank worker: TP=1 and TP=2 against vocab_parallel_logprobs + policy_loss


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_loss_tp")
    torchrun("fused_loss_tp.py", out)
    return out


def _load(out, name, tp, rank):
    return torch.load(out / f"{name}_tp{tp}_rank{rank}.pt")


def _grad_tol(name: str) -> float:
    return 2e-2 if CASES[name].dtype == torch.bfloat16 else 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["hidden", "logits"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_reference(worker_out, name, tp, variant):
    for rank in range(tp):
        res = _load(worker_out, name, tp, rank)
        ref, fused = (res["ref"], res["fused"]) if variant == "hidden" else (res["ref_logits"], res["fused_logits"])
        assert ref["loss"].abs() > 0
        assert_close(fused["loss"], ref["loss"], 1e-5, "loss")
        assert_close(fused["lp"], ref["lp"], 1e-5, "logprobs")
        assert_close(fused["ent"], ref["ent"], 1e-5, "entropy")
        assert set(fused["metrics"]) == set(ref["metrics"])
        for key, value in ref["metrics"].items():
            assert_close(fused["metrics"][key], value, 1e-5, key)
        grads = ("d_hidden", "d_weight") if variant == "hidden" else ("d_logits",)
        for g in grads:
            assert ref[g].abs().max() > 0, f"{g}: reference gradient is all zero"
            assert_close(fused[g].float(), ref[g].float(), _grad_tol(name), g)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_tp2_matches_tp1(worker_out, name):
    tp1 = _load(worker_out, name, 1, 0)["fused"]
    tp2 = [_load(worker_out, name, 2, rank)["fused"] for rank in range(2)]
    for rank, res in enumerate(tp2):
        for key in ("loss", "lp", "ent"):
            assert_close(res[key], tp1[key], 1e-5, f"rank {rank} {key}")
        assert_close(res["d_hidden"].float(), tp1["d_hidden"].float(), _grad_tol(name), f"rank {rank} d_hidden")
    d_weight = torch.cat([res["d_weight"] for res in tp2])  # vocab shards, in rank order
    assert_close(d_weight.float(), tp1["d_weight"].float(), _grad_tol(name), "d_weight")


@pytest.mark.slow
def test_cases_switch_on_what_they_name(worker_out):
    # Otherwise the parity tests above could pass with a term silently inactive.
    metrics = {name: _load(worker_out, name, 1, 0)["ref"]["metrics"] for name in CASES}
    for name, m in metrics.items():
        assert 0 < m["pg_clipfrac"] < 1, name
        if CASES[name].cfg.dual_clip_c is not None:
            assert m["pg_clipfrac_lower"] > 0, name
        if CASES[name].cfg.tis_cap is not None:
            assert abs(m["tis_weight_mean"] - 1) > 1e-3, name
        if CASES[name].cfg.rollout_correction == "mis":
            assert 0.1 < m["rc_masked_frac"] < 0.9, name  # both kept and dropped tokens


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_capture_lm_head_input_matches_model_logits_and_gradients(worker_out, tie, tp):
    for rank in range(tp):
        res = torch.load(worker_out / f"capture_tie{int(tie)}_tp{tp}_rank{rank}.pt")
        assert res["hidden_shape"].tolist() == [2, 12, 64]
        assert_close(res["captured_logits"], res["logits"], 1e-6, "hidden @ weight.T vs model logits")
        assert torch.equal(res["logits_after"], res["logits"]), "the output layer was not restored"
        assert_close(res["fwd_lp"], res["ref_lp"], 1e-5, "forward-only logprobs")
        assert_close(res["fwd_ent"], res["ref_ent"], 1e-5, "forward-only entropy")
        assert_close(res["fused_loss"], res["ref_loss"], 1e-5, "loss")
        assert set(res["fused_grads"]) == set(res["ref_grads"])
        for name, ref in res["ref_grads"].items():
            assert ref.abs().max() > 0, f"{name}: reference gradient is all zero"
            # Decoder gradients are only right at TP=2 if d_hidden was all-reduced over TP.
            assert_close(res["fused_grads"][name], ref, 1e-5, name)


def test_triton_that_imports_but_cannot_compile_falls_back_to_pytorch(monkeypatch):
    """Issue 8: a Triton launch failure turns Triton off with one warning; results equal the PyTorch path."""
    from agpo_megatron.ops import fused_chunks, triton_fused_loss

    p = problem(dtype=torch.float32)
    args, kw = loss_args(p)
    want = fused_policy_loss_from_hidden(p["hidden"].clone().requires_grad_(), p["weight"], *args, **kw)[0]

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(fused_chunks, "triton_failure", None)
    monkeypatch.setattr(fused_chunks, "use_triton", lambda logits: fused_chunks.triton_failure is None)  # as on a GPU
    monkeypatch.setattr(triton_fused_loss, "chunk_stats", broken)
    monkeypatch.setattr(triton_fused_loss, "chunk_dlogits", broken)
    with pytest.warns(UserWarning, match="Triton kernels failed .*C compiler.*PyTorch path"):
        got = fused_policy_loss_from_hidden(p["hidden"].clone().requires_grad_(), p["weight"], *args, **kw)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert calls == [1] and "C compiler" in fused_chunks.triton_failure  # tried once, then off for the process


def test_out_of_memory_in_triton_is_not_hidden(monkeypatch):
    from agpo_megatron.ops import fused_chunks

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fused_chunks, "triton_failure", None)
    with pytest.raises(torch.OutOfMemoryError):
        fused_chunks.with_triton_fallback(oom, lambda: None)
    assert fused_chunks.triton_failure is None


@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_on_policy_old_logprobs_none_equals_passing_the_current_ones(chunk_tokens):
    """Issue 10: old_logprobs=None (the first update of a rollout) is the explicit detached current
    log-probs, bit for bit: loss, metrics and both gradients, chunk by chunk (fp32, TIS and all on)."""
    p = problem(dtype=torch.float32)
    _, kw = loss_args(p)
    hidden, weight = p["hidden"], p["weight"]
    current = fused_logprobs_entropy(hidden, p["targets"], weight=weight, chunk_tokens=chunk_tokens)[0]
    out = {}
    for label, old in (("explicit", current), ("none", None)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics, _, _ = fused_policy_loss_from_hidden(
            h, w, p["targets"], old, p["adv"], p["mask"], CFG, chunk_tokens=chunk_tokens, **kw
        )
        loss.backward()
        out[label] = (loss.detach(), metrics, h.grad, w.grad)
    (l1, m1, h1, w1), (l2, m2, h2, w2) = out["explicit"], out["none"]
    assert torch.equal(l1, l2) and torch.equal(h1, h2) and torch.equal(w1, w2)
    assert all(torch.equal(m1[k], m2[k]) for k in m1) and m2["approx_kl"] == 0 and m2["pg_clipfrac"] == 0
