"""The RL algorithm as pure tensor functions: rewards, advantages, policy loss, controllers, DAPO's group filter.
No torch.distributed and no agpo_megatron import outside algo/; everything above may use it.
"""

from agpo_megatron.algo.advantages import agpo_advantages, compute_advantages, grpo_advantages, rloo_advantages
from agpo_megatron.algo.controllers import (
    AdaptiveClipConfig,
    AdaptiveClipController,
    AdaptiveKLConfig,
    AdaptiveKLController,
    FixedClipController,
    FixedKLController,
)
from agpo_megatron.algo.loss import PolicyLossConfig, aggregate, kl_penalty, policy_loss, sequence_mean
from agpo_megatron.algo.rewards import combine_rewards, length_reward, overlong_penalty
from agpo_megatron.algo.sampling import group_unit, mixed_groups, trainable_groups

__all__ = [
    "AdaptiveClipConfig",
    "AdaptiveClipController",
    "AdaptiveKLConfig",
    "AdaptiveKLController",
    "FixedClipController",
    "FixedKLController",
    "PolicyLossConfig",
    "aggregate",
    "agpo_advantages",
    "combine_rewards",
    "compute_advantages",
    "group_unit",
    "grpo_advantages",
    "kl_penalty",
    "length_reward",
    "mixed_groups",
    "overlong_penalty",
    "policy_loss",
    "rloo_advantages",
    "sequence_mean",
    "trainable_groups",
]
