"""DAPO's dynamic sampling, the group arithmetic (Yu et al. 2025, "DAPO", Sec. 3.2 "Dynamic Sampling").

A group whose G rewards are all equal gets advantage 0 under GRPO / Dr.GRPO / RLOO and adds nothing to
the gradient but tokens to the normaliser. DAPO drops such groups and samples more prompts until the
batch is full of *mixed* groups (the paper's constraint `0 < |{o_i : o_i correct}| < G`).

Choices:

* The test is on the **accuracy** reward, as in the paper's constraint, not on the shaped total
  (accuracy + AGPO's length reward + overlong punishment). A group that is all wrong but of varying
  lengths has a non-uniform total under the overlong punishment; keeping it would train on length
  alone, which is what the punishment's own groups inside mixed batches already do. verl calls this
  choice `filter_groups.metric: acc`.
* Groups are kept or dropped whole, so every kept group still has its G samples and its own
  group statistics.
* A short batch (fewer mixed groups than asked for once the round limit is hit) is cut to a
  multiple of `unit` groups (`trainable_groups`), the smallest count the trainer can split into whole
  mini-batches over the data-parallel ranks and micro-batches; the cut groups are reported as dropped.
"""

from __future__ import annotations

import math

import torch

__all__ = ["mixed_groups", "trainable_groups", "group_unit"]


def mixed_groups(r_acc: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:  # [P, G] -> [P] bool
    """True for groups whose accuracy rewards are not all equal (`max - min > tol`)."""
    if r_acc.ndim != 2 or r_acc.shape[1] < 2:
        raise ValueError(f"r_acc must be [P, G] with G >= 2, got shape {tuple(r_acc.shape)}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return r_acc.amax(dim=1) - r_acc.amin(dim=1) > tol


def group_unit(*, dp: int, group_size: int, micro_batch_size: int) -> int:
    """The smallest number of groups that splits into whole groups per data-parallel rank and whole
    micro-batches per rank: n with `n % dp == 0` and `(n * G / dp) % micro_batch_size == 0`."""
    if min(dp, group_size, micro_batch_size) < 1:
        raise ValueError(
            f"dp, group_size and micro_batch_size must be >= 1, got {dp}, {group_size}, {micro_batch_size}"
        )
    return dp * (micro_batch_size // math.gcd(group_size, micro_batch_size))


def trainable_groups(num_mixed: int, target: int, unit: int) -> int:
    """How many of `num_mixed` collected groups to train: `target` when there are enough, else the
    largest multiple of `unit` below `num_mixed` (0 when fewer than `unit` were found)."""
    if num_mixed < 0 or target < 1 or unit < 1:
        raise ValueError(f"need num_mixed >= 0, target >= 1, unit >= 1; got {num_mixed}, {target}, {unit}")
    if num_mixed >= target:
        return target
    return num_mixed // unit * unit
