"""The algorithm section of the training config, `algo.*`: advantage, rewards, loss, the A-GRPO
controllers, DAPO's dynamic sampling and overlong handling. The loss's own settings are
`algo/loss.py`'s `PolicyLossConfig`, used here as `algo.loss`."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

from agpo_megatron.algo.controllers import AdaptiveClipConfig, AdaptiveKLConfig
from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.validate import require as _require
from agpo_megatron.config.yaml_io import ConfigError


@dataclasses.dataclass(kw_only=True)
class KLControllerConfig:
    """A-GRPO's adaptive beta_t (algo/controllers.py), on when `algo.adaptive_kl_target` is set. It starts
    at max(algo.loss.kl_coef, beta_min): a multiplicative controller cannot leave 0."""

    horizon: float = 10.0
    """Steps H over which a saturated error changes beta by about e^0.2; >= 1."""
    ema_decay: float = 0.9
    """Decay of the moving average of the measured KL to the reference; in [0, 1), 0 = no smoothing."""
    beta_min: float = 1e-6
    """Lower bound on beta; > 0."""
    beta_max: float = 1.0
    """Upper bound on beta; >= beta_min and >= algo.loss.kl_coef."""


@dataclasses.dataclass(kw_only=True)
class ClipControllerConfig:
    """A-GRPO's adaptive eps_t (algo/controllers.py), on with `algo.adaptive_clip`. It starts at
    algo.loss.eps_low / eps_high, which must lie in [eps_min, eps_max]."""

    target_kl: float = 0.01
    """KL between the current and the old policy (per token, `approx_kl`) to steer towards; > 0."""
    horizon: float = 10.0
    """Steps H over which a saturated error changes both clip ranges by about e^(+-0.2); >= 1."""
    ema_decay: float = 0.9
    """Decay of the moving average of the measured KL; in [0, 1), 0 = no smoothing."""
    eps_min: float = 0.05
    """Lower bound on both clip ranges; > 0."""
    eps_max: float = 0.4
    """Upper bound on both clip ranges; in [eps_min, 1) (eps_low must stay below 1)."""


@dataclasses.dataclass(kw_only=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (Yu et al. 2025): prompt groups whose accuracy rewards are all equal (all
    correct or all wrong) are dropped whole, and more prompts are sampled until batch.prompts_per_rollout
    mixed groups are collected or max_rollout_rounds is reached (train/rollout_rounds.py)."""

    enabled: bool = False
    """Turn dynamic sampling on. Each extra round samples another batch.prompts_per_rollout prompts."""
    max_rollout_rounds: int = 3
    """Most rounds of generation per step, >= 1. A step that still has too few mixed groups trains on
    those it has (whole mini-batches' worth, see train/rollout_rounds.py) and says so in
    `sampling/short_batch`."""
    allow_with_m1: bool = False
    """Run dynamic sampling together with AGPO's m1 (algo.advantage=agpo) on purpose. Refused otherwise:
    the groups m1 gives +1 / -1 are exactly the ones dynamic sampling drops, so m1 would never act."""

    def __post_init__(self) -> None:
        _require(
            self.max_rollout_rounds >= 1,
            f"algo.dynamic_sampling.max_rollout_rounds must be >= 1, got {self.max_rollout_rounds}",
        )


@dataclasses.dataclass(kw_only=True)
class OverlongConfig:
    """DAPO's overlong handling of responses that reach rollout.max_new_tokens (algo/rewards.py)."""

    filter: bool = False
    """Mask truncated responses (finish_reason "length") out of the loss: they still count in their
    group's reward statistics, but no token of theirs is trained or counted in the loss normaliser."""
    soft_punishment: bool = False
    """Add DAPO's soft overlong punishment to the reward before the advantage: 0 up to
    rollout.max_new_tokens - buffer_tokens, then falling linearly to -penalty at rollout.max_new_tokens.
    Added after the length reward (m2): r = r_acc + gamma * r_len + r_overlong."""
    buffer_tokens: int | None = None
    """Length of the punishment ramp, in tokens; in [1, rollout.max_new_tokens). None = a fifth of
    rollout.max_new_tokens, DAPO's proportion (4096 of 20480), filled in when the config loads."""
    penalty: float = 1.0
    """Punishment at rollout.max_new_tokens (DAPO: 1.0); >= 0."""

    def __post_init__(self) -> None:
        _require(
            self.buffer_tokens is None or self.buffer_tokens >= 1,
            f"algo.overlong.buffer_tokens must be >= 1, got {self.buffer_tokens}",
        )
        _require(self.penalty >= 0, f"algo.overlong.penalty must be >= 0, got {self.penalty}")


def _controller(cls, where: str, **kw):
    """`cls(**kw)`, its ValueError (which starts with the field's name) as a ConfigError naming `where`."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


@dataclasses.dataclass(kw_only=True)
class AlgoConfig:
    advantage: Literal["grpo", "drgrpo", "rloo", "agpo"] = "agpo"
    """Group advantage: GRPO (r-mean)/std, Dr.GRPO (no std), RLOO (r minus the mean of the other G-1), or
    AGPO's revised advantage (m1). Dr.GRPO also replaces the per-sequence length normalisation by a
    constant, so 'drgrpo' is Dr.GRPO only with algo.loss.agg_mode: seq-mean-token-sum-norm (warned otherwise)."""
    length_reward: bool = True
    """AGPO m2: add gamma * length reward before the advantage."""
    gamma: float = 0.1
    """Length-reward weight (paper: 0.1)."""
    group_size: int = 5
    """G: responses sampled per prompt (paper: 5)."""
    r_min: float = 0.0
    """Lowest possible reward; a uniform group at r_min gets advantage -1 (AGPO)."""
    r_max: float = 1.0
    """Highest reward a uniform group can have; uniform at r_max gets +1 (AGPO)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch, each of batch.prompts_per_rollout / prompts_per_update optimizer steps."""
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """Token-level loss: clip range, KL, entropy bonus, aggregation (see algo/loss.py)."""
    fused_loss: bool = True
    """Use the chunked vocab-parallel fused loss; False = plain reference path."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk in the fused loss (bounds live memory to chunk x vocab/TP)."""
    adaptive_kl_target: float | None = None
    """A-GRPO: if set, beta_t adapts so the moving-average KL tracks this target."""
    kl_controller: KLControllerConfig = dataclasses.field(default_factory=KLControllerConfig)
    """Settings of the adaptive beta_t (used only with adaptive_kl_target)."""
    adaptive_clip: bool = False
    """A-GRPO: adapt the clip range eps_t from the moving-average KL."""
    clip_controller: ClipControllerConfig = dataclasses.field(default_factory=ClipControllerConfig)
    """Settings of the adaptive eps_t (used only with adaptive_clip)."""
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """Mixture-of-experts only: which expert choices the update's forward replays (models/routing.py).
    'none': the update routes freely; 'r2': it replays the routing of the old-log-prob forward
    (needs rollout.logprob_mode=recompute); 'r3': the old-log-prob forward and the update both
    replay the routing vLLM sampled with (needs vLLM's Model Runner V2: CUDA and Triton, refused
    elsewhere; docs/moe.md).
    Either way `train/moe_routing_mismatch` reports the fraction of (response token, MoE layer)
    pairs the update routes, or would route, differently; under r3 `train/moe_rollout_routing_mismatch`
    compares vLLM's routing with the trainer's at the sampling weights."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient (each skipped: no update) before the run
    stops with an error."""
    dynamic_sampling: DynamicSamplingConfig = dataclasses.field(default_factory=DynamicSamplingConfig)
    """DAPO's dynamic sampling: drop uniform-accuracy groups, sample more prompts (off by default)."""
    overlong: OverlongConfig = dataclasses.field(default_factory=OverlongConfig)
    """DAPO's overlong filtering and soft overlong punishment (both off by default)."""

    def __post_init__(self) -> None:
        _require(self.group_size >= 2, f"algo.group_size must be >= 2 (group statistics need 2), got {self.group_size}")
        _require(self.gamma >= 0, f"algo.gamma must be >= 0, got {self.gamma}")
        _require(self.r_max > self.r_min, f"algo.r_max ({self.r_max}) must exceed algo.r_min ({self.r_min})")
        _require(self.ppo_epochs >= 1, f"algo.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _require(self.max_bad_steps >= 0, f"algo.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        _require(self.loss_chunk_tokens >= 1, f"algo.loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        _require(
            self.adaptive_kl_target is None or self.adaptive_kl_target > 0,
            f"algo.adaptive_kl_target must be > 0, got {self.adaptive_kl_target}",
        )
        self.kl_settings(), self.clip_settings()  # validate the controllers' settings (when they are on)
        if self.advantage == "drgrpo" and self.loss.agg_mode != "seq-mean-token-sum-norm":
            # A warning, not an error: no-std advantages under another aggregation is a legitimate
            # ablation (Dr.GRPO's two fixes one at a time), but it is not Dr.GRPO.
            warnings.warn(
                f"algo.advantage=drgrpo with algo.loss.agg_mode={self.loss.agg_mode} is not Dr.GRPO, which "
                "divides each response's token sum by a constant generation budget: set "
                "algo.loss.agg_mode=seq-mean-token-sum-norm",
                stacklevel=2,
            )
        _require(
            not self.dynamic_sampling.enabled or self.advantage != "agpo" or self.dynamic_sampling.allow_with_m1,
            "algo.dynamic_sampling.enabled with algo.advantage=agpo: dynamic sampling drops the all-correct and "
            "all-wrong groups that AGPO's m1 gives +1 / -1, so m1 would never act; use another algo.advantage, "
            "or set algo.dynamic_sampling.allow_with_m1=true to run both on purpose",
        )

    def kl_settings(self) -> AdaptiveKLConfig | None:
        """The adaptive-beta controller's settings, or None when beta is fixed."""
        if self.adaptive_kl_target is None:
            return None
        k, where = self.kl_controller, "algo.kl_controller"
        _controller(
            AdaptiveKLConfig, where, init_beta=k.beta_min, target_kl=self.adaptive_kl_target, **dataclasses.asdict(k)
        )
        _require(
            self.loss.kl_coef <= k.beta_max,
            f"algo.loss.kl_coef={self.loss.kl_coef:g} is the adaptive beta's "
            f"start and must be <= algo.kl_controller.beta_max={k.beta_max:g}",
        )
        return _controller(
            AdaptiveKLConfig,
            where,
            init_beta=max(self.loss.kl_coef, k.beta_min),
            target_kl=self.adaptive_kl_target,
            **dataclasses.asdict(k),
        )

    def clip_settings(self) -> AdaptiveClipConfig | None:
        """The adaptive-clip controller's settings, or None when eps is fixed."""
        if not self.adaptive_clip:
            return None
        c, where = self.clip_controller, "algo.clip_controller"
        _controller(AdaptiveClipConfig, where, init_eps_low=c.eps_min, init_eps_high=c.eps_min, **dataclasses.asdict(c))
        for name in ("eps_low", "eps_high"):
            value = getattr(self.loss, name)
            _require(
                c.eps_min <= value <= c.eps_max,
                f"algo.loss.{name}={value:g} is the adaptive clip's start and must "
                f"be in [algo.clip_controller.eps_min, eps_max] = [{c.eps_min:g}, {c.eps_max:g}]",
            )
        return _controller(
            AdaptiveClipConfig,
            where,
            init_eps_low=self.loss.eps_low,
            init_eps_high=self.loss.eps_high,
            **dataclasses.asdict(c),
        )
