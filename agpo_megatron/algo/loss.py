"""Token-level clipped policy-gradient loss: the plain-PyTorch reference implementation.

A fused kernel elsewhere is tested against this module, so every step is spelled out and
nothing is approximated beyond what is listed below.

Per response token t of sequence i, with ratio `rho = exp(logp - logp_old)` and the
sequence advantage `A` (GRPO / AGPO: one value per sequence, broadcast over its tokens)::

    pg   = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))      PPO (Schulman 2017)
    pg   = min(pg, -A * c)                    if A < 0 and dual clip on    (Ye et al. 2020)
    pg   = pg * w(logp_old, logp_rollout).detach()    rollout correction (algo/correction.py): TIS, MIS
    loss = pg + beta * KL_hat(logp, logp_ref) - alpha * H                 GRPO (Shao et al. 2024)

`eps_low != eps_high` is DAPO's clip-higher (Yu et al. 2025).

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"), `ratio_level="sequence"`: every token
of response i uses the *sequence* importance ratio, the geometric mean of its token ratios::

    s_i  = exp( (1 / |y_i|) * sum_{t in y_i} (logp_t - logp_old_t) )      (differentiated through)
    pg_t = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))   same for all t of y_i

so the clip keeps or drops a response whole. With `agg_mode="seq-mean-token-mean"` the loss is
GSPO's `-1/G sum_i min(s_i A_i, clip(s_i) A_i)` exactly (each response's |y_i| equal terms average
to one); GSPO's clip range is far narrower than PPO's (the paper: 3e-4 / 4e-4). TIS, truncated importance
sampling, corrects for the mismatch between the inference engine that sampled the rollouts
(`logp_rollout`) and the trainer's recomputation of the same policy (`logp_old`).

KL estimators, with `p = pi_theta`, `q = pi_ref`, `r = q / p = exp(logp_ref - logp)` and
tokens sampled from p (Schulman 2020, "Approximating KL divergence"). A term's *value* (what is
logged) and its *gradient* as a loss (samples from p, not differentiated through) are different
questions; `tests/algo/test_loss.py` checks both against exact values on a categorical::

    estimator  per token                 value estimates            gradient as a loss is
    k1         -log r                    KL(p||q), unbiased         0 in expectation (useless as a loss)
    k2         0.5 (log r)^2             KL(p||q) to 2nd order      grad KL(p||q), exactly
    k3         (r - 1) - log r           KL(p||q), unbiased, >= 0   grad KL(q||p), the *reverse* KL
    symmetric  0.5 (r - 1) log r         0.5 (KL(p||q) + KL(q||p))  grad of the same, exactly

"symmetric" is half the Jeffreys divergence (A-GRPO's symmetric KL): KL(p||q) = E_p[-log r] and
KL(q||p) = E_p[r log r]. Used directly as a loss its gradient would be 43% off on a small
example, so its gradient is taken from `0.5 * (k2 + k3)` (exact: k2's gradient is the forward
KL's, k3's the reverse's) while its value stays the unbiased estimate above (a straight-through
combination, see `kl_penalty`).

Aggregation (`algo/aggregation.py::aggregate`) returns each micro-batch's share of the *global*
batch mean, which makes the loss independent of how the batch is split over micro-batches and
data-parallel ranks; see that function.

Departures from the papers (numerical only):

* Log-ratios are clamped to [-20, 20] before `exp` (policy ratio, k3, symmetric KL, TIS
  weight). `exp(20)` ~ 4.9e8 is far beyond any ratio a sane update produces, and without the
  clamp a single extreme token overflows to inf, and `0 * inf` in the backward of the
  unselected branch of `max` / `where` turns the gradient into NaN. Tokens outside the
  clamp get zero gradient from that term.
* Masked tokens are replaced by zeros (`torch.where`) *before* any arithmetic, so padding with
  arbitrary values (-inf, NaN, -1e30) contributes exactly 0 to the loss and to the gradient.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from agpo_megatron.algo.aggregation import AggMode, GlobalCount, aggregate, sequence_mean
from agpo_megatron.algo.correction import CorrectionLevel, RolloutCorrection, correction_weights

__all__ = ["PolicyLossConfig", "kl_penalty", "aggregate", "sequence_mean", "policy_loss", "AggMode", "GlobalCount"]

Metrics = dict[str, torch.Tensor]
KLEstimator = Literal["k1", "k2", "k3", "symmetric"]
RatioLevel = Literal["token", "sequence"]

_MAX_LOG_RATIO = 20.0


@dataclass(kw_only=True, frozen=True)
class PolicyLossConfig:
    """Static settings of `policy_loss`."""

    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped from below at `1 - eps_low`; `0 <= eps_low < 1`."""

    eps_high: float = 0.2
    """Upper clip range: the ratio is clipped from above at `1 + eps_high`; `>= 0`. DAPO's
    clip-higher uses 0.28 with `eps_low = 0.2` to leave room for low-probability tokens."""

    dual_clip_c: float | None = None
    """Dual-clip constant `c > 1` (Ye et al. 2020): for negative advantages the per-token loss is
    capped at `c * |A|` so that a huge ratio cannot blow up the update. None disables it."""

    kl_coef: float = 0.0
    """KL penalty weight beta, `>= 0`. The KL to the reference policy is part of the loss only
    when > 0 (then `ref_logprobs` are required)."""

    kl_estimator: KLEstimator = "k3"
    """Per-token KL estimator: `"k1"`, `"k2"`, `"k3"` or `"symmetric"` (see module doc)."""

    entropy_coef: float = 0.0
    """Entropy bonus weight, `>= 0`: the loss is lowered by `entropy_coef * entropy`. When > 0,
    the per-token `entropy` is required."""

    agg_mode: AggMode = "token-mean"
    """How per-token losses become one scalar: `"token-mean"` (DAPO, every token weighs the
    same), `"seq-mean-token-mean"` (original GRPO, every sequence weighs the same) or
    `"seq-mean-token-sum"` (no length normalisation, divided by the sequence count) or
    `"seq-mean-token-sum-norm"` (Dr.GRPO exactly: the token sum divided by the constant generation
    budget `norm_tokens` x the sequence count)."""

    norm_tokens: int | None = None
    """The constant per-sequence token budget of `"seq-mean-token-sum-norm"` (Dr.GRPO's generation
    budget), `>= 1`. None = the trainer config fills in `rollout.max_new_tokens`; a direct
    `policy_loss` call in that mode must set it."""

    ratio_level: RatioLevel = "token"
    """`"token"`: PPO's per-token ratio. `"sequence"`: GSPO's sequence ratio, the geometric mean of
    the token ratios of a response, clipped per response (module doc)."""

    tis_cap: float | None = None
    """Truncated importance sampling cap `C > 0` on `exp(old_logprobs - rollout_logprobs)`.
    When set, `rollout_logprobs` are required, and `rollout_correction` becomes `"tis"` if it was
    `"none"`. Needs `rollout.logprob_mode: recompute` (the trainer config refuses `rollout`, where
    old == rollout log-probs and the weight is 1)."""

    rollout_correction: RolloutCorrection = "none"
    """Correction for the rollout engine's mismatch with the trainer (algo/correction.py): each
    token's policy-gradient term is multiplied by a detached weight `exp(old - rollout)`,
    truncated at `tis_cap` (`"tis"`), or zeroed outside `[mis_low, mis_high]` (`"mis"`, masked
    importance sampling); `"none"` leaves it out. Anything but none needs `rollout_logprobs`."""

    correction_level: CorrectionLevel = "token"
    """`"token"`: each token's own weight. `"sequence"`: every token of a response gets the
    geometric mean of its response's token weights, so a response is truncated or dropped whole."""

    mis_low: float = 0.5
    """Lower bound of the trusted weight range of `"mis"`, `>= 0`; weights below it are dropped."""

    mis_high: float = 2.0
    """Upper bound of the trusted weight range of `"mis"`, `> mis_low`; weights above it are dropped."""

    def __post_init__(self) -> None:
        # `not (...)` forms also reject NaN.
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if not self.eps_high >= 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in get_args(KLEstimator):
            raise ValueError(f"kl_estimator must be one of {get_args(KLEstimator)}, got {self.kl_estimator!r}")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.agg_mode not in get_args(AggMode):
            raise ValueError(f"agg_mode must be one of {get_args(AggMode)}, got {self.agg_mode!r}")
        if self.norm_tokens is not None and not (isinstance(self.norm_tokens, int) and self.norm_tokens >= 1):
            raise ValueError(f"norm_tokens must be an integer >= 1 or None, got {self.norm_tokens!r}")
        if self.ratio_level not in get_args(RatioLevel):
            raise ValueError(f"ratio_level must be one of {get_args(RatioLevel)}, got {self.ratio_level!r}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")
        if self.rollout_correction not in get_args(RolloutCorrection):
            raise ValueError(
                f"rollout_correction must be one of {get_args(RolloutCorrection)}, got {self.rollout_correction!r}"
            )
        if self.correction_level not in get_args(CorrectionLevel):
            raise ValueError(
                f"correction_level must be one of {get_args(CorrectionLevel)}, got {self.correction_level!r}"
            )
        if self.tis_cap is not None and self.rollout_correction == "none":  # tis_cap alone keeps meaning TIS
            object.__setattr__(self, "rollout_correction", "tis")
        if self.rollout_correction == "tis" and self.tis_cap is None:
            raise ValueError("rollout_correction='tis' needs tis_cap (the truncation C)")
        if self.rollout_correction == "mis" and self.tis_cap is not None:
            raise ValueError(f"tis_cap={self.tis_cap} belongs to rollout_correction='tis', not 'mis'")
        if not (0.0 <= self.mis_low < self.mis_high):
            raise ValueError(f"mis_low / mis_high must satisfy 0 <= low < high, got {self.mis_low} / {self.mis_high}")


def _clamped_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def kl_penalty(
    logprobs: torch.Tensor,  # [N, T] current policy pi_theta
    ref_logprobs: torch.Tensor,  # [N, T] reference policy
    estimator: KLEstimator,
) -> torch.Tensor:  # [N, T]
    """Per-token estimate of the KL between the current and the reference policy.

    No masking is applied: values at padding positions are whatever the inputs make them.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have the same shape, "
            f"got {tuple(logprobs.shape)} and {tuple(ref_logprobs.shape)}"
        )
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_r) - 1.0 - log_r
    if estimator == "symmetric":
        log_r = log_r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        r = torch.exp(log_r)
        value = 0.5 * (r - 1.0) * log_r  # unbiased for half the Jeffreys divergence
        grad_source = 0.5 * (0.5 * log_r.square() + (r - 1.0 - log_r))  # 0.5 * (k2 + k3): exact gradient
        return value.detach() + (grad_source - grad_source.detach())

    raise ValueError(f"estimator must be one of {get_args(KLEstimator)}, got {estimator!r}")


def _check_like(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of logprobs {tuple(shape)}, got {tuple(x.shape)}")


def policy_loss(
    logprobs: torch.Tensor,  # [N, T] current policy, carries the gradient
    old_logprobs: torch.Tensor | None,  # [N, T] policy that sampled (as recomputed by the trainer)
    advantages: torch.Tensor,  # [N] (broadcast over tokens) or [N, T]
    mask: torch.Tensor,  # [N, T], nonzero = response token that counts
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: torch.Tensor | None = None,  # [N, T] reference policy, for the KL term
    entropy: torch.Tensor | None = None,  # [N, T] per-token entropy of the current policy
    rollout_logprobs: torch.Tensor | None = None,  # [N, T] from the inference engine, for TIS
    kl_coef: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    global_num_tokens: GlobalCount | None = None,
    global_num_seqs: GlobalCount | None = None,
    seq_ids: torch.Tensor | None = None,  # [N, T] sequence of each token in a packed batch
) -> tuple[torch.Tensor, Metrics]:
    """Clipped policy-gradient loss of one micro-batch, aggregated as `cfg.agg_mode`.

    `kl_coef`, `eps_low` and `eps_high` override the values of `cfg` when not None, so an
    adaptive controller can change them every step; they are validated like the config.
    `global_num_tokens` / `global_num_seqs` / `seq_ids` are passed to `aggregate`
    (`seq_ids`: packed rows holding several sequences; pass `advantages` per token then).

    `old_logprobs=None` means on-policy: the weights being trained sampled the batch, so the old
    log-probs are `logprobs.detach()` (ratio exactly 1), which saves the trainer a forward pass.
    Loss, gradient and metrics are then those of passing the same values explicitly.

    Returns the 0-dim loss and detached 0-dim metrics, each a mean over this micro-batch's valid
    tokens unless noted: `pg_loss`, `pg_clipfrac` (clipped branch active),
    `pg_clipfrac_lower` (dual clip active; 0 when off), `approx_kl` (k3 of the current
    policy against `old_logprobs`), `ratio_mean`, `ratio_max`, `ratio_min` (1 when there
    is no valid token; with `ratio_level="sequence"` these describe the sequence ratios, each
    counted once per token), `num_tokens` (count), and when applicable `kl_ref`, `entropy`,
    `tis_weight_mean` (tis) and `rc_weight_mean`, `rc_weight_max`, `rc_masked_frac` (any rollout correction).

    Raises ValueError when a term is switched on but its input is missing: `kl_coef > 0`
    without `ref_logprobs`, `entropy_coef > 0` without `entropy`, `tis_cap` without
    `rollout_logprobs`.
    """
    given: dict[str, float | None] = {"kl_coef": kl_coef, "eps_low": eps_low, "eps_high": eps_high}
    overrides: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)  # re-runs the config validation

    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be 2-D [N, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    _check_like("old_logprobs", old_logprobs, shape)
    _check_like("mask", mask, shape)
    optional = {"ref_logprobs": ref_logprobs, "entropy": entropy, "rollout_logprobs": rollout_logprobs}
    for name, x in optional.items():
        if x is not None:
            _check_like(name, x, shape)
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must have shape [N] {tuple(shape[:1])} or [N, T] {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logprobs")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} > 0 needs entropy")
    # A cap without engine log-probs would silently train without the correction it asks for.
    if cfg.rollout_correction != "none" and rollout_logprobs is None:
        raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs rollout_logprobs")

    mask = mask.bool()
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    # Zeroing padding first keeps garbage (-inf, NaN) out of every exp and every backward.
    logprobs = torch.where(mask, logprobs, 0.0)
    old_logprobs = torch.where(mask, old_logprobs, 0.0)
    advantages = torch.where(mask, advantages, 0.0)

    log_ratio = logprobs - old_logprobs
    if cfg.ratio_level == "sequence":  # GSPO: each token carries its response's mean log-ratio
        log_ratio = sequence_mean(log_ratio, mask, seq_ids)
    ratio = _clamped_exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    if cfg.dual_clip_c is not None:
        pg_dual = -advantages * cfg.dual_clip_c
        dual_clipped = (advantages < 0) & (pg > pg_dual)
        pg = torch.where(dual_clipped, pg_dual, pg)
    else:
        dual_clipped = torch.zeros_like(clipped)

    rc_weight, rc_metrics = None, dict[str, torch.Tensor]()
    if cfg.rollout_correction != "none":
        assert rollout_logprobs is not None  # checked with the other inputs above
        # A correction factor, not something to optimise: no gradient flows through it.
        rc_weight, rc_metrics = correction_weights(
            old_logprobs,
            torch.where(mask, rollout_logprobs, 0.0),
            mask,
            cfg.rollout_correction,
            level=cfg.correction_level,
            tis_cap=cfg.tis_cap,
            mis_low=cfg.mis_low,
            mis_high=cfg.mis_high,
            seq_ids=seq_ids,
        )
        pg = pg * rc_weight

    per_token = pg
    kl_ref = None
    if ref_logprobs is not None:
        ref_logprobs = torch.where(mask, ref_logprobs, 0.0)
        if cfg.kl_coef > 0:
            kl_ref = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
            per_token = per_token + cfg.kl_coef * kl_ref
        else:
            with torch.no_grad():
                kl_ref = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
    if entropy is not None:
        entropy = torch.where(mask, entropy, 0.0)
        if cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy

    loss = aggregate(
        per_token,
        mask,
        cfg.agg_mode,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        seq_ids=seq_ids,
        norm_tokens=cfg.norm_tokens,
    )

    with torch.no_grad():
        num_tokens = mask.sum()
        has_tokens = num_tokens > 0
        denom = num_tokens.clamp(min=1)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x.detach().float(), 0.0).sum() / denom

        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        ratio_max = torch.where(mask, ratio, -torch.inf).amax()
        ratio_min = torch.where(mask, ratio, torch.inf).amin()
        metrics = {
            "pg_loss": masked_mean(pg),
            "pg_clipfrac": masked_mean(clipped),
            "pg_clipfrac_lower": masked_mean(dual_clipped),
            "approx_kl": masked_mean(kl_penalty(logprobs, old_logprobs, "k3")),
            "ratio_mean": masked_mean(ratio),
            "ratio_max": torch.where(has_tokens, ratio_max.detach(), one),
            "ratio_min": torch.where(has_tokens, ratio_min.detach(), one),
            "num_tokens": num_tokens.float(),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = masked_mean(kl_ref)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy)
        if rc_weight is not None:
            metrics.update(rc_metrics)
            if cfg.rollout_correction == "tis":
                metrics["tis_weight_mean"] = masked_mean(rc_weight)
    return loss, metrics
