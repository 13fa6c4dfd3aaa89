"""AGPO length-aware reward (Li et al. 2025, "Adaptive Group Policy Optimization", arXiv 2503.15952v1,
modification m2, "length-based reward").

NOTE: formulas are named, not numbered: the paper's equation numbers differ between its arXiv
versions (v2 and v3 rewrote the method as one "revised objective"), and an earlier numbering here
was wrong.

Within a group of G answers to one prompt, correct answers are rewarded for being short
relative to the other correct answers of the same group::

    lambda_i = 1 - (L_i - L_min) / (L_max - L_min)

    r_len_i = lambda_i   if answer i is correct and the group is not all correct
              0          otherwise

with L_min / L_max the shortest / longest response among the group's correct answers. The
training reward is then::

    r_i = r_acc_i + gamma * r_len_i          (the paper uses gamma = 0.1)

Order of operations, as in the paper: the length reward is computed first, combined with the
accuracy reward, and the advantage (`agpo_megatron.algo.advantages`) is computed on the
combined reward. All-correct groups get no length reward, so their combined rewards stay
uniform and AGPO's revised advantage (m1) still gives every sample +1. Where the length reward does act, a
wrong answer (reward 0) still ranks below every correct one (reward >= 1) for any gamma >= 0
(with binary accuracy rewards).

DAPO's soft overlong punishment (Yu et al. 2025, Sec. 3.4, "Overlong Reward Shaping"), with L_max =
rollout.max_new_tokens, a ramp of `buffer` tokens and a weight `penalty` (the paper: 1)::

    r_over(L) = 0                                   L <= L_max - buffer
                -penalty * (L - (L_max - buffer)) / buffer    otherwise (reaching -penalty at L_max)

Order (`overlong_penalty`): r = r_acc + gamma * r_len + r_over. The length reward is computed on
accuracy and lengths alone and the punishment is added to the sum, so the two compose
independently: a correct answer in the buffer keeps its length bonus over its group's other correct
answers and loses up to `penalty`. Side effect with AGPO's m1: an all-correct group with one answer
in the buffer is no longer uniform at r_max, so it gets GRPO's advantage instead of +1.
The paper's third case (L > L_max: -1) cannot occur: the engine stops at L_max, and a response
stopped there scores -penalty by the ramp (longer ones, if any, too).

Choices the paper leaves open:

* L_min and L_max are taken over the group's *correct* answers only; wrong answers neither get
  a length reward nor influence it.
* When the correct answers all have the same length (which includes the case of exactly one
  correct answer), `L_max - L_min = 0`; we treat the fraction as 0, i.e. lambda = 1, so
  each correct answer still gets the full length bonus over the wrong ones.
"""

import torch

__all__ = ["length_reward", "combine_rewards", "overlong_penalty"]

Metrics = dict[str, torch.Tensor]


def length_reward(
    correct: torch.Tensor,  # [P, G] bool
    lengths: torch.Tensor,  # [P, G] int or float, response token counts
) -> tuple[torch.Tensor, Metrics]:
    """Per-sample AGPO length reward `r_len` of shape `[P, G]` (float32), the paper's length reward.

    Metrics: `len_reward_mean` (mean r_len over the correct answers of groups that are
    neither all-correct nor all-wrong; 0 if there are none), `num_len_reward_groups`
    (number of such groups, i.e. groups that received a length reward) and
    `frac_len_reward_groups` (that number over P: the fraction of groups where m2 fires).
    """
    if correct.ndim != 2 or correct.dtype != torch.bool:
        raise ValueError(
            f"correct must be a 2-D bool tensor [P, G], got shape {tuple(correct.shape)} and dtype {correct.dtype}"
        )
    if lengths.shape != correct.shape:
        raise ValueError(f"lengths must have the shape of correct {tuple(correct.shape)}, got {tuple(lengths.shape)}")

    lengths = lengths.to(torch.float32)
    group_size = correct.shape[1]
    num_correct = correct.sum(dim=1, keepdim=True)  # [P, 1]
    # Groups with at least one correct and at least one wrong answer; the only ones rewarded.
    mixed = (num_correct > 0) & (num_correct < group_size)  # [P, 1]

    # Wrong answers are pushed to +-inf so that they never win the min / max; a group without
    # correct answers ends up with an infinite span, which the `span > 0` test below and the
    # `mixed` mask both discard.
    inf = torch.full_like(lengths, float("inf"))
    min_len = torch.where(correct, lengths, inf).amin(dim=1, keepdim=True)  # [P, 1]
    max_len = torch.where(correct, lengths, -inf).amax(dim=1, keepdim=True)  # [P, 1]
    span = max_len - min_len
    has_span = span > 0
    frac = (lengths - min_len) / torch.where(has_span, span, torch.ones_like(span))
    frac = torch.where(has_span, frac, torch.zeros_like(frac))

    rewarded = correct & mixed  # [P, G]
    r_len = torch.where(rewarded, 1.0 - frac, torch.zeros_like(frac))

    num_rewarded = rewarded.sum()
    metrics = {
        "len_reward_mean": r_len.sum() / num_rewarded.clamp(min=1),
        "num_len_reward_groups": mixed.sum().float(),
        "frac_len_reward_groups": mixed.float().mean(),
    }
    return r_len, metrics


def combine_rewards(
    r_acc: torch.Tensor,  # [P, G] float
    r_len: torch.Tensor,  # [P, G] float
    gamma: float,
) -> torch.Tensor:  # [P, G]
    """Training reward `r_acc + gamma * r_len` (the paper's combined reward; it uses gamma = 0.1)."""
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if r_acc.shape != r_len.shape:
        raise ValueError(f"r_acc and r_len must have the same shape, got {tuple(r_acc.shape)} and {tuple(r_len.shape)}")
    if not r_acc.is_floating_point():
        raise ValueError(f"r_acc must be a floating-point tensor, got dtype {r_acc.dtype}")
    return r_acc + gamma * r_len


def overlong_penalty(
    lengths: torch.Tensor,  # [P, G] response token counts
    *,
    max_new_tokens: int,
    buffer_tokens: int,
    penalty: float,
) -> tuple[torch.Tensor, Metrics]:  # [P, G] float32, <= 0
    """DAPO's soft overlong punishment `r_over` (module doc), to add to the reward.

    Metrics: `overlong_penalty_mean` (mean r_over over all samples) and `frac_overlong_punished`
    (fraction of samples with r_over < 0).
    """
    if not 1 <= buffer_tokens < max_new_tokens:
        raise ValueError(f"buffer_tokens must be in [1, max_new_tokens={max_new_tokens}), got {buffer_tokens}")
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    start = max_new_tokens - buffer_tokens
    excess = (lengths.to(torch.float32) - start).clamp(min=0.0, max=float(buffer_tokens))  # > L_max: -penalty
    r_over = -penalty * excess / buffer_tokens
    metrics = {
        "overlong_penalty_mean": r_over.mean(),
        "frac_overlong_punished": (r_over < 0).float().mean(),
    }
    return r_over, metrics
