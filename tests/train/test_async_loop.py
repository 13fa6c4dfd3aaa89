"""The asynchronous loop's queue (train/async_loop.py): whole groups, versions, drops and ages."""

import pytest

from agpo_megatron.data.datasets import Example
from agpo_megatron.rollout.base import Completion
from agpo_megatron.train.async_loop import Group, StalenessQueue


def group(i: int, version: int) -> Group:
    ex = Example(prompt_ids=[i], prompt_text=str(i), gold=str(i), index=i)
    completions = [
        Completion(prompt_index=i, token_ids=[i, j], logprobs=None, text="", finish_reason="", weight_version=version)
        for j in range(3)
    ]
    return Group(ex, completions, version)


def test_groups_older_than_the_staleness_are_dropped_and_ages_reported():
    q = StalenessQueue(max_staleness=2, capacity=10)
    q.push([group(0, 0), group(1, 0), group(2, 1), group(3, 3), group(4, 3)])
    # Trainer at version 3: the two version-0 groups are 3 old (> 2): dropped. Then the oldest 2.
    got, m = q.pop(2, version=3)
    assert [g.example.prompt_ids for g in got] == [[2], [3]]
    assert all(len(g.completions) == 3 for g in got)  # whole groups
    assert m == {
        "dropped_groups": 2.0,
        "reused_groups": 1.0,  # the version-1 group, trained 2 versions later
        "age_mean": 1.0,  # ages 2 and 0
        "age_max": 2.0,
        "queued_groups": 1.0,
        "weights_version": 3.0,
        # whole responses: each token as old as its group (6 tokens at age 2, 6 at 0), none paused
        "token_age_mean": 1.0,
        "token_age_max": 2.0,
        "paused_token_frac": 0.0,
    }
    # The counts are per pop: the next step starts from zero.
    got, m = q.pop(5, version=3)
    assert [g.example.prompt_ids for g in got] == [[4]] and m["dropped_groups"] == 0 and m["reused_groups"] == 0


def test_staleness_0_keeps_only_groups_of_the_current_weights():
    q = StalenessQueue(max_staleness=0, capacity=4)
    q.push([group(0, 4), group(1, 5)])
    got, m = q.pop(2, version=5)
    assert [g.version for g in got] == [5] and m["dropped_groups"] == 1 and m["age_max"] == 0


def test_a_full_queue_drops_its_oldest_groups():
    q = StalenessQueue(max_staleness=5, capacity=2)
    q.push([group(0, 0), group(1, 1), group(2, 2)])
    got, m = q.pop(3, version=2)
    assert [g.version for g in got] == [1, 2] and m["dropped_groups"] == 1 and m["age_mean"] == 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        StalenessQueue(-1, 4)
    with pytest.raises(ValueError):
        StalenessQueue(1, 0)
