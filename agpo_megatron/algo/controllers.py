"""Per-step controllers for the KL coefficient and the clip range (the A-GRPO options).

Both adaptive controllers smooth the KL measured at each optimizer step with an exponential
moving average (EMA) and turn it into a saturated relative error::

    ema_t = kl_1                                     (first step: no zero-initialisation bias)
    ema_t = d * ema_{t-1} + (1 - d) * kl_t           (later steps; d = ema_decay)
    e_t   = clip((ema_t - target_kl) / target_kl, -0.2, 0.2)

The KL controller is meant to be fed the KL to the reference policy (`kl_ref` of the loss
metrics), the clip controller the KL between the current and the old policy (`approx_kl`) of
the off-policy updates: the trainer passes the mean over updates 2.. of a rollout (train/ppo.py); update 1
runs at the sampling weights, where it is 0.

KL coefficient, proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models
from Human Preferences")::

    beta_{t+1} = clip(beta_t * (1 + e_t / H), beta_min, beta_max)

Clip range, our formulation (A-GRPO's exact rule is not public): the policy is moving too fast
when the KL is above target, so the trust region shrinks; it widens when below::

    eps_{t+1} = clip(eps_t * (1 - e_t / H), eps_min, eps_max)     for eps_low and eps_high alike

Departures from Ziegler et al.:

* They feed the raw per-batch KL and set `K_beta = n_samples / H` with H counted in samples;
  we feed the EMA and count the horizon H in optimizer steps (one update per step). With a
  saturated error, beta moves by at most a factor `(1 + 0.2 / H)^H ~ e^0.2 ~ 1.22` over H steps.
* beta is clipped to `[beta_min, beta_max]`; `beta_min > 0` because a multiplicative
  controller can never leave 0.

The controllers live on the host and take a Python float: the measured KL is expected to be
already reduced over data-parallel ranks by the caller, so that every rank computes the same
value and the replicas stay in lockstep. A non-finite measurement comes from a step that made no
update (runtime/nonfinite.py skips it): it is ignored and the controller keeps its values.

The trainer always holds one controller of each kind (`kl_controller`, `clip_controller`): a fixed
one when the config does not ask for adaptation, so the loop never branches on it.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "AdaptiveKLConfig",
    "AdaptiveKLController",
    "FixedKLController",
    "AdaptiveClipConfig",
    "AdaptiveClipController",
    "FixedClipController",
    "kl_controller",
    "clip_controller",
]

_MAX_REL_ERROR = 0.2


def _finite_kl(measured_kl: float | torch.Tensor) -> float | None:
    """The measurement as a float, or None for a non-finite one (a skipped step: nothing to learn)."""
    measured_kl = float(measured_kl)
    return measured_kl if math.isfinite(measured_kl) else None


def _ema(previous: float | None, value: float, decay: float) -> float:
    return value if previous is None else decay * previous + (1.0 - decay) * value


def _rel_error(ema_kl: float, target_kl: float) -> float:
    # Saturating keeps a single outlier step from moving the knob by more than 0.2 / H.
    return min(max((ema_kl - target_kl) / target_kl, -_MAX_REL_ERROR), _MAX_REL_ERROR)


def _check_state_keys(state: dict[str, Any], expected: set[str], owner: str) -> None:
    if set(state) != expected:
        raise ValueError(f"{owner} state_dict must have keys {sorted(expected)}, got {sorted(state)}")


@dataclass(kw_only=True, frozen=True)
class AdaptiveKLConfig:
    """Settings of `AdaptiveKLController`."""

    init_beta: float = 0.001
    """KL coefficient at step 0; within `[beta_min, beta_max]`."""

    target_kl: float = 0.01
    """KL (to the reference policy, per token) the controller steers towards; > 0."""

    horizon: float = 10.0
    """Steps H over which a saturated error changes beta by about `e^0.2`; >= 1."""

    ema_decay: float = 0.9
    """Decay d of the moving average of the measured KL; in [0, 1), 0 = no smoothing."""

    beta_min: float = 1e-6
    """Lower bound on beta; > 0 (a multiplicative update cannot recover from 0)."""

    beta_max: float = 1.0
    """Upper bound on beta; >= beta_min."""

    def __post_init__(self) -> None:
        if not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0, got {self.target_kl}")
        if not self.horizon >= 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.beta_min > 0:
            raise ValueError(f"beta_min must be > 0, got {self.beta_min}")
        if not self.beta_max >= self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min={self.beta_min}, got {self.beta_max}")
        if not self.beta_min <= self.init_beta <= self.beta_max:
            raise ValueError(
                f"init_beta must be in [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}], got {self.init_beta}"
            )


class AdaptiveKLController:
    """KL coefficient that adapts towards a target KL (see module docstring for the rule)."""

    def __init__(self, cfg: AdaptiveKLConfig) -> None:
        self.cfg = cfg
        self.beta = cfg.init_beta
        self.ema_kl: float | None = None
        self.num_updates = 0

    stateful = True

    def update(self, measured_kl: float | torch.Tensor) -> float:
        """Fold in this step's KL and return beta for the next step."""
        cfg, kl = self.cfg, _finite_kl(measured_kl)
        if kl is None:
            return self.beta
        self.ema_kl = _ema(self.ema_kl, kl, cfg.ema_decay)
        error = _rel_error(self.ema_kl, cfg.target_kl)
        self.beta = min(max(self.beta * (1.0 + error / cfg.horizon), cfg.beta_min), cfg.beta_max)
        self.num_updates += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "ema_kl": self.ema_kl, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state_keys(state, {"beta", "ema_kl", "num_updates"}, type(self).__name__)
        self.beta = float(state["beta"])
        self.ema_kl = None if state["ema_kl"] is None else float(state["ema_kl"])
        self.num_updates = int(state["num_updates"])


class FixedKLController:
    """Constant KL coefficient with the interface of `AdaptiveKLController`."""

    def __init__(self, beta: float) -> None:
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    stateful = False

    def update(self, measured_kl: float | torch.Tensor | None) -> float:
        """Return the constant beta; the measurement is not needed."""
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        # Stateless: the constant comes from the config, which is the source of truth on resume.
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        _check_state_keys(state or {}, set(), type(self).__name__)


@dataclass(kw_only=True, frozen=True)
class AdaptiveClipConfig:
    """Settings of `AdaptiveClipController`."""

    init_eps_low: float = 0.2
    """Lower clip range at step 0; within `[eps_min, eps_max]`."""

    init_eps_high: float = 0.2
    """Upper clip range at step 0; within `[eps_min, eps_max]`."""

    target_kl: float = 0.01
    """KL (current vs. old policy, per token; e.g. `approx_kl` of the loss) to steer towards; > 0."""

    horizon: float = 10.0
    """Steps H over which a saturated error changes the clip ranges by about `e^(+-0.2)`; >= 1."""

    ema_decay: float = 0.9
    """Decay d of the moving average of the measured KL; in [0, 1), 0 = no smoothing."""

    eps_min: float = 0.05
    """Lower bound on both clip ranges; > 0 (a multiplicative update cannot recover from 0)."""

    eps_max: float = 0.4
    """Upper bound on both clip ranges; in [eps_min, 1) because eps_low must stay below 1."""

    def __post_init__(self) -> None:
        if not self.target_kl > 0:
            raise ValueError(f"target_kl must be > 0, got {self.target_kl}")
        if not self.horizon >= 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.eps_min > 0:
            raise ValueError(f"eps_min must be > 0, got {self.eps_min}")
        if not self.eps_min <= self.eps_max < 1:
            raise ValueError(f"eps_max must be in [eps_min, 1) = [{self.eps_min}, 1), got {self.eps_max}")
        for name in ("init_eps_low", "init_eps_high"):
            value = getattr(self, name)
            if not self.eps_min <= value <= self.eps_max:
                raise ValueError(
                    f"{name} must be in [eps_min, eps_max] = [{self.eps_min}, {self.eps_max}], got {value}"
                )


class AdaptiveClipController:
    """Clip ranges that shrink when the policy moves faster than the target KL, widen when slower.

    eps_low and eps_high are scaled by the same factor each step, so an asymmetric
    (clip-higher) setting keeps its ratio until one of them reaches a bound.
    """

    def __init__(self, cfg: AdaptiveClipConfig) -> None:
        self.cfg = cfg
        self.eps_low = cfg.init_eps_low
        self.eps_high = cfg.init_eps_high
        self.ema_kl: float | None = None
        self.num_updates = 0

    stateful = True

    @property
    def eps(self) -> tuple[float, float]:
        return self.eps_low, self.eps_high

    def update(self, measured_kl: float | torch.Tensor) -> tuple[float, float]:
        """Fold in this step's KL and return `(eps_low, eps_high)` for the next step."""
        cfg, kl = self.cfg, _finite_kl(measured_kl)
        if kl is None:
            return self.eps
        self.ema_kl = _ema(self.ema_kl, kl, cfg.ema_decay)
        factor = 1.0 - _rel_error(self.ema_kl, cfg.target_kl) / cfg.horizon
        self.eps_low = min(max(self.eps_low * factor, cfg.eps_min), cfg.eps_max)
        self.eps_high = min(max(self.eps_high * factor, cfg.eps_min), cfg.eps_max)
        self.num_updates += 1
        return self.eps_low, self.eps_high

    def state_dict(self) -> dict[str, Any]:
        return {
            "eps_low": self.eps_low,
            "eps_high": self.eps_high,
            "ema_kl": self.ema_kl,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state_keys(state, {"eps_low", "eps_high", "ema_kl", "num_updates"}, type(self).__name__)
        self.eps_low = float(state["eps_low"])
        self.eps_high = float(state["eps_high"])
        self.ema_kl = None if state["ema_kl"] is None else float(state["ema_kl"])
        self.num_updates = int(state["num_updates"])


class FixedClipController:
    """Constant clip ranges with the interface of `AdaptiveClipController`."""

    def __init__(self, eps_low: float, eps_high: float) -> None:
        if not 0 <= eps_low < 1:
            raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
        if not eps_high >= 0:
            raise ValueError(f"eps_high must be >= 0, got {eps_high}")
        self.eps_low = eps_low
        self.eps_high = eps_high

    stateful = False

    @property
    def eps(self) -> tuple[float, float]:
        return self.eps_low, self.eps_high

    def update(self, measured_kl: float | torch.Tensor | None) -> tuple[float, float]:
        """Return the constant `(eps_low, eps_high)`; the measurement is not needed."""
        return self.eps

    def state_dict(self) -> dict[str, Any]:
        # Stateless: the constants come from the config, which is the source of truth on resume.
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        _check_state_keys(state or {}, set(), type(self).__name__)


KLController = AdaptiveKLController | FixedKLController
ClipController = AdaptiveClipController | FixedClipController


def kl_controller(settings: AdaptiveKLConfig | None, beta: float) -> KLController:
    """The adaptive controller for `settings`, or a fixed `beta` when there are none."""
    return AdaptiveKLController(settings) if settings is not None else FixedKLController(beta)


def clip_controller(settings: AdaptiveClipConfig | None, eps: tuple[float, float]) -> ClipController:
    """The adaptive controller for `settings`, or fixed `(eps_low, eps_high)` when there are none."""
    return AdaptiveClipController(settings) if settings is not None else FixedClipController(*eps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state_keys(state, set(), type(self).__name__)
