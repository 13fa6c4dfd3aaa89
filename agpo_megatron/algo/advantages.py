"""Group-relative advantage estimators: GRPO, Dr.GRPO, RLOO and AGPO.

Every prompt p is sampled G times; `rewards[p, i]` is the scalar reward of sample i. All
estimators are outcome-level: one advantage per sample, broadcast over its tokens by the loss.

GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision)::

    A_{p,i} = (r_{p,i} - mean_j r_{p,j}) / (std_j r_{p,j} + eps)

Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") drops the std division::

    A_{p,i} = r_{p,i} - mean_j r_{p,j}

RLOO (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024)
uses the mean of the *other* G - 1 samples as the baseline, which keeps it independent of the
sample it is subtracted from::

    A_{p,i} = r_{p,i} - 1/(G-1) sum_{j != i} r_{p,j}  =  G/(G-1) * (r_{p,i} - mean_j r_{p,j})

AGPO (Li et al. 2025, "Adaptive Group Policy Optimization", arXiv 2503.15952v1, modification m1,
the "revised advantage"; formulas are named, not numbered, as the versions number them differently) keeps GRPO
for groups with reward variance and replaces the zero advantage of uniform groups with a
constant signal, so that all-correct / all-wrong groups still produce a gradient::

    A_{p,i} = +1                                  if r_{p,j} = r_max for all j
              -1                                  if r_{p,j} = r_min for all j
              (r_{p,i} - mean) / (std + eps)      otherwise

Departures from the papers and choices the papers leave open:

* `std` is the unbiased sample std (Bessel's correction, `torch.std` default), as in verl and
  TRL. The DeepSeekMath paper does not say which one it uses. Hence G >= 2 is required: with
  G = 1 the unbiased std is NaN and no group-relative baseline exists anyway.
* "All rewards equal" is tested with a tolerance: a group is uniform when
  `max - min <= tol`, and it sits at r_max (r_min) when its mean is within `tol` of it.
  Rewards that went through float arithmetic (e.g. 0.9999999 from a verifier) thus still count.
* A uniform group whose common value lies strictly between r_min and r_max (possible with shaped
  or combined rewards) gets advantage 0 for every sample. m1 only covers the two extreme
  cases; 0 is what GRPO gives such a group and is the only sign-neutral choice.
* The AGPO +1/-1 constants are used as is, also when `scale_by_std=False`: m1 defines
  them in absolute terms, not relative to the group scale.
* Groups whose rewards are exactly equal get advantage exactly 0 under GRPO/Dr.GRPO. Without
  this, `r - mean` can be one ulp off zero (the mean of identical floats is not always exact)
  and dividing it by `eps` would turn rounding noise into a small spurious signal.
* Dr.GRPO also changes the loss aggregation (no per-sequence length normalisation); that part
  lives in `agpo_megatron.algo.loss` (`agg_mode`), not here.
"""

from typing import Any, Literal

import torch

__all__ = ["grpo_advantages", "rloo_advantages", "agpo_advantages", "compute_advantages"]

Metrics = dict[str, torch.Tensor]
AdvantageEstimator = Literal["grpo", "drgrpo", "rloo", "agpo"]


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.ndim != 2 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a 2-D floating-point tensor of shape [P, G], "
            f"got shape {tuple(rewards.shape)} and dtype {rewards.dtype}"
        )
    num_prompts, group_size = rewards.shape
    if group_size < 2:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} has group size G={group_size}; "
            "group-relative advantages need G >= 2 samples per prompt"
        )
    if num_prompts < 1:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} has no prompt group (P=0)")


def _advantage_metrics(adv: torch.Tensor, uniform: torch.Tensor) -> Metrics:
    # Kept as tensors so that logging does not force a device sync here.
    return {
        "frac_uniform_groups": uniform.float().mean(),
        "adv_mean": adv.mean(),
        "adv_std": adv.std(),
        "adv_abs_max": adv.abs().amax(),
    }


def _group_relative(
    rewards: torch.Tensor,  # [P, G]
    uniform: torch.Tensor,  # [P] bool, groups to treat as having no variance
    *,
    eps: float,
    scale_by_std: bool,
) -> torch.Tensor:  # [P, G]
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = rewards.std(dim=1, keepdim=True)  # unbiased
        # Uniform groups are overwritten below; dividing them by 1 keeps the graph NaN-free
        # even with eps = 0.
        denom = torch.where(uniform[:, None], torch.ones_like(std), std + eps)
        centered = centered / denom
    return torch.where(uniform[:, None], torch.zeros_like(centered), centered)


def grpo_advantages(
    rewards: torch.Tensor,  # [P, G]
    *,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO advantages `(r - mean) / (std + eps)` per group; Dr.GRPO with `scale_by_std=False`.

    Returns the advantages `[P, G]` and metrics: `frac_uniform_groups` (groups whose rewards
    are exactly equal, which get advantage 0), `adv_mean`, `adv_std`, `adv_abs_max`.
    """
    _check_rewards(rewards)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    uniform = rewards.amax(dim=1) == rewards.amin(dim=1)  # [P]
    adv = _group_relative(rewards, uniform, eps=eps, scale_by_std=scale_by_std)
    return adv, _advantage_metrics(adv, uniform)


def rloo_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, Metrics]:  # [P, G] -> [P, G]
    """RLOO advantages `r_i - mean_{j != i} r_j` (leave-one-out baseline), computed as
    `G / (G - 1) * (r_i - mean)`; groups whose rewards are exactly equal get exactly 0.

    Returns the advantages `[P, G]` and the metrics of `grpo_advantages`.
    """
    _check_rewards(rewards)
    group_size = rewards.shape[1]
    uniform = rewards.amax(dim=1) == rewards.amin(dim=1)  # [P]
    adv = _group_relative(rewards, uniform, eps=0.0, scale_by_std=False) * (group_size / (group_size - 1))
    return adv, _advantage_metrics(adv, uniform)


def agpo_advantages(
    rewards: torch.Tensor,  # [P, G]
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    eps: float = 1e-6,
    tol: float = 1e-6,
    scale_by_std: bool = True,
) -> tuple[torch.Tensor, Metrics]:
    """AGPO advantages (the paper's revised advantage, m1): +1 / -1 for uniform groups at r_max / r_min, else GRPO.

    A group is uniform when `max - min <= tol`. Uniform groups at r_max get +1 for every
    sample, at r_min -1, and 0 when the common value lies strictly between the two.

    Returns the advantages `[P, G]` and metrics: `frac_uniform_groups`,
    `frac_uniform_pos` (uniform at r_max), `frac_uniform_neg` (uniform at r_min),
    `adv_mean`, `adv_std`, `adv_abs_max`.
    """
    _check_rewards(rewards)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    # Otherwise a uniform group could be within tol of both bounds and the sign is ambiguous.
    if not r_max - r_min > 2 * tol:
        raise ValueError(f"r_max must exceed r_min by more than 2 * tol, got r_min={r_min}, r_max={r_max}, tol={tol}")

    uniform = rewards.amax(dim=1) - rewards.amin(dim=1) <= tol  # [P]
    group_mean = rewards.mean(dim=1)  # [P]
    uniform_pos = uniform & ((group_mean - r_max).abs() <= tol)
    uniform_neg = uniform & ((group_mean - r_min).abs() <= tol)

    adv = _group_relative(rewards, uniform, eps=eps, scale_by_std=scale_by_std)
    adv = torch.where(uniform_pos[:, None], torch.ones_like(adv), adv)
    adv = torch.where(uniform_neg[:, None], -torch.ones_like(adv), adv)

    metrics = _advantage_metrics(adv, uniform)
    metrics["frac_uniform_pos"] = uniform_pos.float().mean()
    metrics["frac_uniform_neg"] = uniform_neg.float().mean()
    return adv, metrics


def compute_advantages(
    rewards: torch.Tensor,  # [P, G]
    estimator: AdvantageEstimator,
    **kwargs: Any,
) -> tuple[torch.Tensor, Metrics]:
    """Dispatch to an estimator by name; `kwargs` go to the estimator function.

    `"grpo"` and `"drgrpo"` fix `scale_by_std` (True / False), so passing it for them is an
    error; `"agpo"` accepts it.
    """
    if estimator in ("grpo", "drgrpo"):
        if "scale_by_std" in kwargs:
            raise ValueError(f"scale_by_std is implied by estimator={estimator!r}; do not pass it")
        return grpo_advantages(rewards, scale_by_std=estimator == "grpo", **kwargs)
    if estimator == "rloo":
        return rloo_advantages(rewards, **kwargs)
    if estimator == "agpo":
        return agpo_advantages(rewards, **kwargs)
    raise ValueError(f"estimator must be one of 'grpo', 'drgrpo', 'rloo', 'agpo', got {estimator!r}")
