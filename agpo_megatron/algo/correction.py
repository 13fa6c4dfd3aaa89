"""Rollout-training mismatch correction: a detached importance weight per token.

Three policies meet in the loss when the engine that sampled a rollout is not exactly the trainer
(vLLM's kernels and numerics differ from Megatron's; with asynchronous rollouts its weights are
also older):

    behaviour  logp_rollout  the engine's sampling log-probs
    proximal   logp_old      the trainer's weights before this update (recomputed)
    current    logp          the weights being trained

The PPO ratio and clip use current / proximal (algo/loss.py). This module gives the weight that
corrects the rest, proximal / behaviour, `w = exp(logp_old - logp_rollout)`, detached: it rescales
each token's policy-gradient term and is never optimised. `algo.loss.rollout_correction`:

    none  w = 1
    tis   w = min(w, C)                      truncated importance sampling (Yao et al. 2025), C = tis_cap
    mis   w = w if low <= w <= high, else 0  masked importance sampling: tokens outside the trust
                                             range are dropped from the loss

`correction_level: sequence` replaces each token's log-weight by its response's mean log-weight
(the geometric mean of the token weights), so a response is truncated or dropped whole.

Departure from verl's masked variant (`rollout_rs`): a dropped token still counts in the loss's
normaliser. The global token count is fixed before the update (algo/loss.py `aggregate`), which
keeps the loss independent of the parallel layout; dropping tokens from the count would need a
second global reduction per mini-batch. The gradient shrinks by the dropped fraction, which is
logged (`rc_masked_frac`).
"""

from __future__ import annotations

from typing import Literal

import torch

from agpo_megatron.algo.aggregation import sequence_mean

RolloutCorrection = Literal["none", "tis", "mis"]
CorrectionLevel = Literal["token", "sequence"]

_MAX_LOG_RATIO = 20.0  # as algo/loss.py: exp stays finite, `0 * inf` never reaches a backward


def correction_weights(
    old_logprobs: torch.Tensor,  # [N, T] proximal policy (the trainer's weights before the update)
    rollout_logprobs: torch.Tensor,  # [N, T] behaviour policy (the engine's sampling log-probs)
    mask: torch.Tensor,  # [N, T] bool, valid response tokens
    mode: RolloutCorrection,
    *,
    level: CorrectionLevel = "token",
    tis_cap: float | None = None,
    mis_low: float = 0.5,
    mis_high: float = 2.0,
    seq_ids: torch.Tensor | None = None,  # [N, T] packed rows
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # weights [N, T] (0 on padding), metrics
    """The detached correction weight of every token, and its metrics.

    Metrics (over valid tokens, 0-dim, detached): `rc_weight_mean` and `rc_weight_max` of the raw
    weight exp(logp_old - logp_rollout) (at the chosen level) before truncation or masking, and
    `rc_masked_frac`, the fraction of tokens `mis` drops (0 for the other modes).
    """
    with torch.no_grad():
        mask = mask.bool()
        log_w = torch.where(mask, old_logprobs.detach() - rollout_logprobs.detach(), 0.0)
        if level == "sequence":
            log_w = sequence_mean(log_w, mask, seq_ids)
        raw = torch.exp(log_w.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        dropped = torch.zeros_like(mask)
        if mode == "none":
            w = torch.ones_like(raw)
        elif mode == "tis":
            if tis_cap is None:
                raise ValueError("rollout_correction='tis' needs tis_cap")
            w = raw.clamp(max=tis_cap)
        elif mode == "mis":
            dropped = mask & ((raw < mis_low) | (raw > mis_high))
            w = torch.where(dropped, 0.0, raw)
        else:
            raise ValueError(f"rollout_correction must be 'none', 'tis' or 'mis', got {mode!r}")
        w = torch.where(mask, w, 0.0)
        n = mask.sum().clamp(min=1)
        metrics = {
            "rc_weight_mean": torch.where(mask, raw, 0.0).sum() / n,
            "rc_weight_max": torch.where(mask, raw, 0.0).amax() if mask.any() else raw.new_ones(()),
            "rc_masked_frac": dropped.sum().to(raw.dtype) / n,
        }
    return w, metrics
