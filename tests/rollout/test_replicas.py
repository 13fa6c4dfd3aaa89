"""Engine-agnostic rollout plumbing (rollout/replicas.py): replica layout, prompt split, request
seeds, and the gather of completions (over a simulated 4-rank world)."""

import pytest
import torch.distributed as dist

from agpo_megatron.rollout.base import Completion
from agpo_megatron.rollout.replicas import ReplicaLayout, gather_completions, request_seed, split_prompts


def test_split_prompts_covers_each_index_once_in_order():
    assert split_prompts(5, 2) == [range(0, 3), range(3, 5)]
    assert split_prompts(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    for num, reps in [(0, 1), (7, 3), (32, 8), (3, 5)]:
        chunks = split_prompts(num, reps)
        assert [i for c in chunks for i in c] == list(range(num))
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_replica_layout_is_tp_innermost_like_vllm():
    assert ReplicaLayout.of_rank(5, 8, 2) == ReplicaLayout(replica=2, num_replicas=4, tp_rank=1, tp=2)
    assert ReplicaLayout.of_rank(3, 4, 1) == ReplicaLayout(replica=3, num_replicas=4, tp_rank=0, tp=1)
    with pytest.raises(ValueError, match="divide the world size"):
        ReplicaLayout.of_rank(0, 6, 4)


def test_request_seeds_of_one_call_do_not_overlap():
    # vLLM gives sample j of a request the seed request_seed + j.
    n = 8
    seeds = [request_seed(3, i, n) + j for i in range(1000) for j in range(n)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds)
    assert request_seed(3, 0, n) != request_seed(4, 0, n)


def test_gather_takes_tp_rank_0_of_each_replica_in_replica_order(monkeypatch):
    # World of 4, rollout_tp=2: replicas {0,1} and {2,3}. TP peers hold the same results; rank 1
    # and rank 3 contribute nothing, so a wrong stride or a TP peer's copy would show.
    def comp(i):
        return [Completion(prompt_index=i, token_ids=[i], logprobs=None, text="", finish_reason="stop")]

    per_rank = {0: [comp(0), comp(1)], 1: [comp(0), comp(1)], 2: [comp(2)], 3: [comp(2)]}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    sent = []

    def all_gather_object(out, obj):
        sent.append(obj)
        for r in range(4):  # what each rank would send, given its own layout
            out[r] = per_rank[r] if ReplicaLayout.of_rank(r, 4, 2).tp_rank == 0 else None

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    layout = ReplicaLayout.of_rank(3, 4, 2)
    got = gather_completions(per_rank[3], layout)
    assert sent == [None]  # rank 3 is TP-rank 1 of its replica
    assert [c[0].prompt_index for c in got] == [0, 1, 2]


def test_gather_is_the_identity_without_a_world(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    local = [[Completion(prompt_index=0, token_ids=[1], logprobs=None, text="", finish_reason="stop")]]
    assert gather_completions(local, ReplicaLayout.of_rank(0, 1, 1)) is local
