import math

import pytest
import torch
from torch.testing import assert_close

from agpo_megatron.algo.loss import PolicyLossConfig, aggregate, kl_penalty, policy_loss

LN2 = math.log(2.0)
AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def _leaf(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# ----------------------------------------------------------------------------- aggregation

# Row 0 has 2 valid tokens (1, 2), row 1 has 1 (4); 3 and 5, 6 are padding.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 4) / 3),  # 7 / 3 valid tokens
        ("seq-mean-token-mean", (3 / 2 + 4 / 1) / 2),  # 2.75
        ("seq-mean-token-sum", (3 + 4) / 2),  # 3.5
    ],
)
def test_aggregate_ragged_mask(mode, expected):
    assert_close(aggregate(PER_TOKEN, MASK, mode), torch.tensor(expected))
    # A float 0/1 mask means the same thing.
    assert_close(aggregate(PER_TOKEN, MASK.float(), mode), torch.tensor(expected))


def test_aggregate_with_global_counts_returns_the_share_of_the_global_mean():
    # As if the global batch held 7 tokens in 4 sequences.
    assert_close(aggregate(PER_TOKEN, MASK, "token-mean", global_num_tokens=7), torch.tensor(1.0))
    assert_close(aggregate(PER_TOKEN, MASK, "seq-mean-token-mean", global_num_seqs=4), torch.tensor(5.5 / 4))
    # Counts from an all-reduce arrive as tensors.
    seq_sum = aggregate(PER_TOKEN, MASK, "seq-mean-token-sum", global_num_seqs=torch.tensor(4))
    assert_close(seq_sum, torch.tensor(7 / 4))


def test_aggregate_ignores_padding_values_and_counts_empty_rows():
    per_token = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert_close(aggregate(per_token, mask, "token-mean"), torch.tensor(7 / 3))
    assert_close(aggregate(per_token, mask, "seq-mean-token-mean"), torch.tensor(5.5 / 3))
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum"), torch.tensor(7 / 3))
    # A batch without valid tokens gives 0, not NaN.
    assert_close(aggregate(per_token, torch.zeros_like(mask), "token-mean"), torch.tensor(0.0))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_losses_with_global_counts_sum_to_the_full_batch_loss(mode):
    gen = torch.Generator().manual_seed(0)
    n, t = 4, 5
    logprobs = (-torch.rand(n, t, generator=gen)).requires_grad_()
    old = logprobs.detach() + 0.3 * torch.randn(n, t, generator=gen)
    ref = logprobs.detach() + 0.3 * torch.randn(n, t, generator=gen)
    entropy = torch.rand(n, t, generator=gen)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    lengths = torch.tensor([5, 2, 4, 1])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    cfg = PolicyLossConfig(agg_mode=mode, kl_coef=0.1, entropy_coef=0.01, dual_clip_c=3.0)

    full, _ = policy_loss(logprobs, old, adv, mask, cfg, ref_logprobs=ref, entropy=entropy)
    (full_grad,) = torch.autograd.grad(full, logprobs)

    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 4)):
        part, _ = policy_loss(
            logprobs[rows],
            old[rows],
            adv[rows],
            mask[rows],
            cfg,
            ref_logprobs=ref[rows],
            entropy=entropy[rows],
            global_num_tokens=int(mask.sum()),
            global_num_seqs=n,
        )
        total = total + part
    (split_grad,) = torch.autograd.grad(total, logprobs)

    assert_close(total, full)
    assert_close(split_grad, full_grad)


# ----------------------------------------------------------------------------- clipped surrogate


def test_on_policy_zero_advantage_gives_exactly_zero_gradient():
    logprobs = _leaf([[-0.5, -1.0, -2.0], [-0.1, -3.0, -0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, metrics = policy_loss(logprobs, logprobs.detach(), torch.zeros(2), mask, PolicyLossConfig())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(2, 3))
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["pg_clipfrac"].item() == 0.0
    assert metrics["num_tokens"].item() == 5.0


def test_positive_advantage_above_clip_range_gets_no_gradient():
    ratios = torch.tensor([[1.0, 1.5, 0.5, 1.1]])
    old = torch.zeros(1, 4)
    logprobs = ratios.log().requires_grad_()
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.2)
    loss, metrics = policy_loss(logprobs, old, torch.ones(1), mask, cfg)
    loss.backward()
    # Per token: -1.0, -1.2 (clipped at 1 + 0.2), -0.5 (pessimistic: unclipped 0.5 < 0.8), -1.1
    assert_close(loss, torch.tensor((-1.0 - 1.2 - 0.5 - 1.1) / 4))
    # d/dlogp (-A * ratio) / 4 = -ratio / 4, except the clipped token.
    assert_close(logprobs.grad, torch.tensor([[-0.25, 0.0, -0.125, -0.275]]))
    assert_close(metrics["pg_clipfrac"], torch.tensor(0.25))
    assert_close(metrics["ratio_max"], torch.tensor(1.5))
    assert_close(metrics["ratio_min"], torch.tensor(0.5))
    assert_close(metrics["ratio_mean"], torch.tensor(1.025))
    # k3 with r = 1 / ratio: 1/ratio - 1 + log ratio
    expected_kl = (ratios.reciprocal() - 1 + ratios.log()).mean()
    assert_close(metrics["approx_kl"], expected_kl)


def test_asymmetric_clip_range():
    ratios = torch.tensor([[1.25, 0.75]])
    adv = torch.tensor([[1.0, -1.0]])  # [N, T] advantages
    mask = torch.ones(1, 2, dtype=torch.bool)

    def run(cfg: PolicyLossConfig, **overrides: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logprobs = ratios.log().requires_grad_()
        loss, metrics = policy_loss(logprobs, torch.zeros(1, 2), adv, mask, cfg, **overrides)
        loss.backward()
        return loss, logprobs.grad, metrics

    # Clip-higher: 1.25 < 1 + 0.28 stays unclipped; 0.75 < 1 - 0.2 is clipped for A < 0.
    loss, grad, metrics = run(PolicyLossConfig(eps_low=0.2, eps_high=0.28))
    assert_close(loss, torch.tensor((-1.25 + 0.8) / 2))
    assert_close(grad, torch.tensor([[-1.25 / 2, 0.0]]))
    assert_close(metrics["pg_clipfrac"], torch.tensor(0.5))

    # Symmetric 0.2 clips both.
    loss, grad, metrics = run(PolicyLossConfig(eps_low=0.2, eps_high=0.2))
    assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))
    assert_close(grad, torch.zeros(1, 2))
    assert_close(metrics["pg_clipfrac"], torch.tensor(1.0))

    # The per-step overrides give the same result as a rebuilt config.
    loss_override, grad_override, _ = run(PolicyLossConfig(), eps_high=0.28)
    assert_close(loss_override, torch.tensor((-1.25 + 0.8) / 2))
    assert_close(grad_override, torch.tensor([[-1.25 / 2, 0.0]]))


def test_dual_clip_caps_negative_advantage_loss():
    ratios = torch.tensor([[10.0, 2.0, 10.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    logprobs = ratios.log().requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 3), adv, mask, PolicyLossConfig(dual_clip_c=3.0))
    loss.backward()
    # Token 0: max(10, 1.2) = 10 capped to c * |A| = 3; token 1: 2 < 3 unchanged; token 2 (A > 0):
    # clipped at -1.2 as usual.
    assert_close(loss, torch.tensor((3.0 + 2.0 - 1.2) / 3))
    assert_close(logprobs.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    assert_close(metrics["pg_clipfrac_lower"], torch.tensor(1 / 3))
    assert_close(metrics["pg_clipfrac"], torch.tensor(1 / 3))

    # Without dual clip the first token's loss is the unbounded 10.
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 3), adv, mask, PolicyLossConfig())
    assert_close(loss, torch.tensor((10.0 + 2.0 - 1.2) / 3))
    assert metrics["pg_clipfrac_lower"].item() == 0.0


# ----------------------------------------------------------------------------- KL and entropy

# r = exp(ref - logp) = 0.5, 2, 1
KL_LOGP = torch.tensor([[LN2, 0.0, -1.0]])
KL_REF = torch.tensor([[0.0, LN2, -1.0]])


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", [LN2, -LN2, 0.0]),  # -log r
        ("k2", [0.5 * LN2**2, 0.5 * LN2**2, 0.0]),  # 0.5 (log r)^2
        ("k3", [-0.5 + LN2, 1.0 - LN2, 0.0]),  # (r - 1) - log r
        ("symmetric", [0.25 * LN2, 0.5 * LN2, 0.0]),  # 0.5 (r - 1) log r
    ],
)
def test_kl_estimators_hand_values(estimator, expected):
    assert_close(kl_penalty(KL_LOGP, KL_REF, estimator), torch.tensor([expected]))


def test_k3_and_symmetric_are_nonnegative_and_finite_for_extreme_log_ratios():
    grid = torch.linspace(-50.0, 50.0, steps=201)
    for estimator in ("k3", "symmetric"):
        kl = kl_penalty(torch.zeros_like(grid), grid, estimator)
        assert torch.isfinite(kl).all()
        assert (kl >= 0).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "symmetric"])
def test_kl_gradient_flows_to_logprobs(estimator):
    logprobs = KL_LOGP.clone().requires_grad_()
    kl_penalty(logprobs, KL_REF, estimator).sum().backward()
    log_r = KL_REF - KL_LOGP
    r = log_r.exp()
    expected = {
        "k1": torch.ones_like(r),
        "k2": -log_r,
        "k3": 1.0 - r,
        "symmetric": 0.5 * (-log_r + 1.0 - r),  # 0.5 (k2 + k3)'s gradient, not (0.5 (r - 1) log r)'s
    }[estimator]
    assert_close(logprobs.grad, expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "symmetric"])
def test_kl_estimator_value_and_gradient_against_exact_categorical(estimator):
    """Issue 10: what each estimator's value estimates and what its gradient optimises, exactly.

    p = softmax(theta) over 5 outcomes, q fixed. The expectation over x ~ p of an estimator is
    sum_x p_x k(x); the expected gradient of the loss term is sum_x p_x grad k(x) (samples are
    not differentiated through), both computed exactly here.
    """
    theta = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.9, -1.0, 0.2], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    p, q = logp.exp(), logq.exp()
    fwd = (p * (logp - logq)).sum()  # KL(p || q)
    rev = (q * (logq - logp)).sum()  # KL(q || p)
    value_target, grad_target = {
        "k1": (fwd, torch.zeros(())),
        "k2": (None, fwd),  # biased value
        "k3": (fwd, rev),  # the reverse KL's gradient
        "symmetric": (0.5 * (fwd + rev), 0.5 * (fwd + rev)),
    }[estimator]
    k = kl_penalty(logp[None], logq[None], estimator)[0]  # every outcome, once
    expected_value = (p.detach() * k).sum()
    (expected_grad,) = torch.autograd.grad(expected_value, theta, retain_graph=True)
    want_grad = (
        torch.autograd.grad(grad_target, theta, allow_unused=True)[0]
        if grad_target.requires_grad
        else torch.zeros_like(theta)
    )
    torch.testing.assert_close(expected_grad, want_grad, rtol=1e-9, atol=1e-12)
    if value_target is not None:
        torch.testing.assert_close(expected_value, value_target.detach(), rtol=1e-9, atol=1e-12)


def test_symmetric_kl_as_written_would_have_the_wrong_gradient():
    """The old loss term, 0.5 (r - 1) log r used directly, is far from grad(half Jeffreys) here."""
    theta = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.9, -1.0, 0.2], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    p, q = logp.exp(), logq.exp()
    log_r = logq - logp
    old = (p.detach() * 0.5 * (log_r.exp() - 1) * log_r).sum()
    (g_old,) = torch.autograd.grad(old, theta, retain_graph=True)
    (g_true,) = torch.autograd.grad(0.5 * ((p * (logp - logq)).sum() + (q * (logq - logp)).sum()), theta)
    assert (g_old - g_true).norm() / g_true.norm() > 0.2


def test_kl_term_in_policy_loss():
    logprobs = KL_LOGP[:, :2].clone().requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k3")
    # On-policy with A = 0: only the KL term is left; k3 sums to (ln2 - .5) + (1 - ln2) = 0.5.
    old, ref, adv = logprobs.detach(), KL_REF[:, :2], torch.zeros(1)
    loss, metrics = policy_loss(logprobs, old, adv, mask, cfg, ref_logprobs=ref)
    loss.backward()
    assert_close(loss, torch.tensor(0.1 * 0.5 / 2))
    assert_close(metrics["kl_ref"], torch.tensor(0.25))
    # d k3 / d logp = 1 - r, r = 0.5 and 2
    assert_close(logprobs.grad, torch.tensor([[0.1 * 0.5 / 2, 0.1 * -1.0 / 2]]))

    # kl_coef override (as from an adaptive controller) and kl_coef = 0 still reports kl_ref.
    loss, _ = policy_loss(logprobs, old, adv, mask, cfg, ref_logprobs=ref, kl_coef=0.2)
    assert_close(loss, torch.tensor(0.2 * 0.5 / 2))
    loss, metrics = policy_loss(logprobs, old, adv, mask, PolicyLossConfig(), ref_logprobs=ref)
    assert loss.item() == 0.0
    assert_close(metrics["kl_ref"], torch.tensor(0.25))


def test_entropy_bonus_lowers_the_loss():
    logprobs = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = PolicyLossConfig(entropy_coef=0.01)
    entropy = torch.tensor([[1.0, 2.0]], requires_grad=True)
    low, metrics = policy_loss(logprobs, logprobs, torch.zeros(1), mask, cfg, entropy=entropy)
    high, _ = policy_loss(logprobs, logprobs, torch.zeros(1), mask, cfg, entropy=entropy.detach() + 1.0)
    assert_close(low, torch.tensor(-0.01 * 1.5))
    assert_close(high - low, torch.tensor(-0.01))
    assert_close(metrics["entropy"], torch.tensor(1.5))
    low.backward()
    assert_close(entropy.grad, torch.tensor([[-0.005, -0.005]]))


# ----------------------------------------------------------------------------- TIS


def test_truncated_importance_sampling_weight_is_applied_and_detached():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2)
    # exp(old - rollout) = 0.5 and 3 -> capped at 2
    rollout = torch.tensor([[LN2, -math.log(3.0)]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = policy_loss(
        logprobs, old, torch.ones(1), mask, PolicyLossConfig(tis_cap=2.0), rollout_logprobs=rollout
    )
    loss.backward()
    assert_close(loss, torch.tensor((-0.5 - 2.0) / 2))
    assert_close(logprobs.grad, torch.tensor([[-0.25, -1.0]]))
    assert rollout.grad is None
    assert_close(metrics["tis_weight_mean"], torch.tensor(1.25))
    assert_close(metrics["pg_loss"], torch.tensor(-1.25))


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("mode", AGG_MODES)
def test_masked_garbage_gives_finite_loss_and_zero_gradient(mode):
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    clean = torch.tensor([[-0.5, -1.0], [-0.2, 0.0]])
    garbage = torch.tensor([[-1e30, -1e30], [-1e30, float("nan")]])

    def pad(valid: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([valid, fill], dim=1)

    logprobs = pad(clean, garbage).requires_grad_()
    old = pad(clean - 0.1, torch.zeros(2, 2))
    ref = pad(clean + 0.1, torch.full((2, 2), float("inf")))
    entropy = pad(torch.ones(2, 2), torch.full((2, 2), float("nan")))
    adv = pad(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.full((2, 2), float("nan")))
    cfg = PolicyLossConfig(agg_mode=mode, kl_coef=0.1, entropy_coef=0.01, dual_clip_c=3.0)

    loss, metrics = policy_loss(logprobs, old, adv, mask, cfg, ref_logprobs=ref, entropy=entropy)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logprobs.grad).all()
    assert torch.equal(logprobs.grad[:, 2:], torch.zeros(2, 2))
    assert all(torch.isfinite(v) for v in metrics.values())

    # Same as the batch without the padding columns at all.
    trimmed = clean.clone().requires_grad_()
    expected, _ = policy_loss(
        trimmed, old[:, :2], adv[:, :2], mask[:, :2], cfg, ref_logprobs=ref[:, :2], entropy=entropy[:, :2]
    )
    expected.backward()
    assert_close(loss, expected)
    assert_close(logprobs.grad[:, :2], trimmed.grad)


def test_fully_masked_micro_batch_is_zero_with_neutral_metrics():
    logprobs = torch.full((1, 3), -1e30, requires_grad=True)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 3), torch.ones(1), mask, PolicyLossConfig())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(1, 3))
    assert metrics["num_tokens"].item() == 0.0
    assert metrics["ratio_max"].item() == 1.0 and metrics["ratio_min"].item() == 1.0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"eps_low": 1.0}, "eps_low"),
        ({"eps_low": -0.1}, "eps_low"),
        ({"eps_high": -0.1}, "eps_high"),
        ({"eps_high": float("nan")}, "eps_high"),
        ({"dual_clip_c": 1.0}, "dual_clip_c"),
        ({"kl_coef": -0.01}, "kl_coef"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"entropy_coef": -0.01}, "entropy_coef"),
        ({"agg_mode": "sum"}, "agg_mode"),
        ({"tis_cap": 0.0}, "tis_cap"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    cfg = PolicyLossConfig(eps_high=0.28)
    with pytest.raises(AttributeError):
        cfg.eps_high = 0.3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PolicyLossConfig(0.2)  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg, kwargs, match",
    [
        (PolicyLossConfig(kl_coef=0.1), {}, "ref_logprobs"),
        (PolicyLossConfig(entropy_coef=0.1), {}, "entropy"),
        (PolicyLossConfig(tis_cap=2.0), {}, "rollout_logprobs"),
        (PolicyLossConfig(), {"eps_low": 1.5}, "eps_low"),
        (PolicyLossConfig(), {"kl_coef": -1.0}, "kl_coef"),
        (PolicyLossConfig(), {"ref_logprobs": torch.zeros(2, 2)}, "ref_logprobs"),
        (PolicyLossConfig(), {"global_num_tokens": 0}, "global_num_tokens"),
    ],
)
def test_policy_loss_invalid_arguments_raise(cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), torch.ones(1, 3), cfg, **kwargs)


def test_policy_loss_shape_errors():
    logprobs, mask, cfg = torch.zeros(2, 3), torch.ones(2, 3), PolicyLossConfig()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, torch.zeros(2, 3), torch.zeros(3), mask, cfg)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(logprobs, torch.zeros(2, 2), torch.zeros(2), mask, cfg)
    with pytest.raises(ValueError, match="2-D"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), cfg)
    with pytest.raises(ValueError, match="mode"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k5")  # type: ignore[arg-type]


def test_old_logprobs_none_is_on_policy_bit_for_bit():
    """Issue 10: None = the detached current log-probs (the first update of a rollout skips a forward)."""
    g = torch.Generator().manual_seed(3)
    lp0 = torch.randn(3, 6, generator=g, dtype=torch.float64) - 2
    mask = torch.rand(3, 6, generator=g) > 0.3
    adv, ref, ent = torch.randn(3, generator=g, dtype=torch.float64), lp0 + 0.1, torch.rand(3, 6, dtype=torch.float64)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, agg_mode="seq-mean-token-mean")
    out = []
    for old in (lp0.clone(), None):
        lp = lp0.clone().requires_grad_()
        loss, m = policy_loss(lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent, rollout_logprobs=lp0 - 0.05)
        loss.backward()
        out.append((loss.detach(), m, lp.grad))
    (l1, m1, g1), (l2, m2, g2) = out
    assert torch.equal(l1, l2) and torch.equal(g1, g2) and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert m2["ratio_mean"] == 1 and m2["approx_kl"] == 0


# ----------------------------------------------------------------------------- Dr.GRPO's constant normaliser


def test_seq_mean_token_sum_norm_divides_by_the_budget_times_the_sequence_count():
    # Token sums 3 and 4 over 2 sequences, budget 3: 7 / (3 * 2); with a global count of 4 sequences 7 / 12.
    assert_close(aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", norm_tokens=3), torch.tensor(7 / 6))
    got = aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", norm_tokens=3, global_num_seqs=4)
    assert_close(got, torch.tensor(7 / 12))
    # Packed: the same two sequences in one row give the same value.
    packed = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    ids = torch.tensor([[0, 0, 1, -1]])
    got = aggregate(packed, ids >= 0, "seq-mean-token-sum-norm", norm_tokens=3, seq_ids=ids)
    assert_close(got, torch.tensor(7 / 6))
    with pytest.raises(ValueError, match="norm_tokens"):
        aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm")


def test_drgrpo_norm_gradient_is_the_same_for_every_token_whatever_the_length():
    """Dr.GRPO's point: no 1/|y_i| per sequence; every token's gradient is -A / (budget * N)."""
    lp = _leaf([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 1.0])
    cfg = PolicyLossConfig(agg_mode="seq-mean-token-sum-norm", norm_tokens=4)
    loss, _ = policy_loss(lp, None, adv, mask, cfg)  # on-policy: ratio 1, pg = -A per token
    assert_close(loss, torch.tensor(-4 / (4 * 2)))  # 4 tokens of -1, budget 4, 2 sequences
    (grad,) = torch.autograd.grad(loss, lp)
    assert_close(grad, torch.tensor([[-1 / 8, -1 / 8, -1 / 8], [-1 / 8, 0.0, 0.0]]))
    # seq-mean-token-mean would give the short sequence's token 3x the weight of each long one's.
    loss_mean, _ = policy_loss(lp, None, adv, mask, PolicyLossConfig(agg_mode="seq-mean-token-mean"))
    (grad_mean,) = torch.autograd.grad(loss_mean, lp)
    assert_close(grad_mean[1, 0] / grad_mean[0, 0], torch.tensor(3.0))
    with pytest.raises(ValueError, match="norm_tokens"):
        policy_loss(lp, None, adv, mask, PolicyLossConfig(agg_mode="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match="norm_tokens"):
        PolicyLossConfig(norm_tokens=0)


# ----------------------------------------------------------------------------- GSPO


def _gspo_batch():
    """Three responses (rows), on a wide-open clip except where noted. Log-ratios logp - logp_old:
    row 0 (A=+1): [ln 1.21, 0]    -> s = 1.1,  unclipped
    row 1 (A=-1): [ln 2]          -> s = 2,    unclipped (A < 0: max picks the larger -A*s = 2)
    row 2 (A=+1): [ln 2, 0]       -> s = sqrt 2 > 1 + 0.2: clipped for the WHOLE response
    """
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0], [-1.0, -3.0]])
    log_ratio = torch.tensor([[math.log(1.21), 0.0], [LN2, 0.0], [LN2, 0.0]])
    lp = (old + log_ratio).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 1.0])
    return lp, old, adv, mask


def test_gspo_sequence_ratio_values_and_gradients_by_hand():
    lp, old, adv, mask = _gspo_batch()
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", eps_low=0.2, eps_high=0.2)
    loss, m = policy_loss(lp, old, adv, mask, cfg)
    # Per response: -1.1, +2, -1.2 (clipped); seq-mean over 3 responses.
    assert_close(loss, torch.tensor((-1.1 + 2.0 - 1.2) / 3))
    (grad,) = torch.autograd.grad(loss, lp)
    # d(-s)/dlogp_t = -s / |y| per token; row 2 is clipped, so BOTH its tokens get 0 (a token-level
    # ratio would leave its second token, ratio 1, unclipped with gradient -1/2 * 1/3).
    expected = torch.tensor([[-1.1 / 2 / 3, -1.1 / 2 / 3], [2.0 / 3, 0.0], [0.0, 0.0]])
    assert_close(grad, expected)
    assert_close(m["pg_clipfrac"], torch.tensor(2 / 5))  # both tokens of row 2, of 5 valid tokens
    assert_close(m["ratio_max"], torch.tensor(2.0))
    assert_close(m["ratio_min"], torch.tensor(1.1))


def test_gspo_token_level_differs_on_the_same_batch():
    lp, old, adv, mask = _gspo_batch()
    loss, _ = policy_loss(lp, old, adv, mask, PolicyLossConfig(agg_mode="seq-mean-token-mean"))
    (grad,) = torch.autograd.grad(loss, lp)
    # Token level: row 2's second token (ratio 1) is not clipped: -1 * 1 / 2 tokens / 3 responses.
    assert_close(grad[2, 1], torch.tensor(-1 / 6))


def test_gspo_packed_rows_equal_padded_rows():
    lp, old, adv, mask = _gspo_batch()
    cfg = PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean")
    ref_loss, ref_m = policy_loss(lp, old, adv, mask, cfg)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp)
    # One row: response 0 (2 tokens), 1 (1 token), 2 (2 tokens), one padding slot.
    flat = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    lp_p = torch.stack([lp.detach()[i, t] for i, t in flat] + [torch.tensor(0.0)])[None].requires_grad_()
    old_p = torch.stack([old[i, t] for i, t in flat] + [torch.tensor(5.0)])[None]
    ids = torch.tensor([[0, 0, 1, 2, 2, -1]])
    adv_p = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0, 0.0]])
    loss, _ = policy_loss(lp_p, old_p, adv_p, ids >= 0, cfg, seq_ids=ids, global_num_seqs=3)
    (grad,) = torch.autograd.grad(loss, lp_p)
    assert_close(loss, ref_loss)
    assert_close(grad[0, :5], torch.stack([ref_grad[i, t] for i, t in flat]))
    assert grad[0, 5] == 0


def test_sequence_ratio_ignores_masked_garbage():
    lp = torch.tensor([[-1.0, float("nan"), -1e30]], requires_grad=True)
    old = torch.tensor([[-1.5, float("inf"), 0.0]])
    mask = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    cfg = PolicyLossConfig(ratio_level="sequence", eps_high=10.0)
    loss, _ = policy_loss(lp, old, torch.tensor([1.0]), mask, cfg)
    (grad,) = torch.autograd.grad(loss, lp)
    assert_close(loss, -torch.tensor(0.5).exp())
    assert torch.isfinite(grad).all() and grad[0, 1:].eq(0).all()
    with pytest.raises(ValueError, match="ratio_level"):
        PolicyLossConfig(ratio_level="seq")  # type: ignore[arg-type]
