"""Partial rollouts (rollout/partial.py): segments spliced per token, a weight update while groups are
unfinished, the continuation under the new weights (the loss on the per-token log-probs:
tests/train/test_partial_loss.py).

No processes: a fake engine whose "weights" are a token distribution per version. Prompt [7] always
ends at once (EOS); any other prompt never samples EOS, so it runs to max_new_tokens.
"""

import math

import pytest
import torch

from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.partial import PartialPool, Sample, engine_generate, segment_seed, splice
from agpo_megatron.rollout.replicas import request_seed

EOS = 3
PROBS = {0: [0.5, 0.3, 0.2], 1: [0.1, 0.6, 0.3]}
"""p(token 0, 1, 2) under weight versions 0 and 1: every token's probability differs between them."""


class FakeEngine:
    def __init__(self):
        self.weights_version = 0
        self.fresh = []

    def generate(self, prompts, n, sampling, *, seeds=None, fresh_cache=True):
        self.fresh.append(fresh_cache)
        out = []
        for i, p in enumerate(prompts):
            group = []
            for j in range(n):
                seed = (request_seed(sampling.seed, i, n) if seeds is None else seeds[i]) + j
                g = torch.Generator().manual_seed(seed)
                toks, lps, finish = [], [], "length"
                for _ in range(sampling.max_new_tokens):
                    if p[0] == 7:
                        toks.append(EOS)
                        lps.append(0.0)
                        finish = "stop"
                        break
                    probs = torch.tensor(PROBS[self.weights_version])
                    t = int(torch.multinomial(probs, 1, generator=g))
                    toks.append(t)
                    lps.append(math.log(PROBS[self.weights_version][t]))
                group.append(Completion(prompt_index=i, token_ids=toks, logprobs=lps, text="", finish_reason=finish))
            out.append(group)
        return out


def lp(version, tokens):
    return [math.log(PROBS[version][t]) for t in tokens]


SAMPLING = SamplingConfig(max_new_tokens=5, seed=11, temperature=1.0)


def test_splice_appends_tokens_log_probs_and_versions_and_finishes_at_the_budget():
    s = Sample([5], seed=0)
    s1 = splice(
        s, Completion(prompt_index=0, token_ids=[0, 1], logprobs=[-1.0, -2.0], text="", finish_reason="length"), 3, 5
    )
    assert (s1.token_ids, s1.logprobs, s1.versions, s1.segments, s1.finish_reason) == (
        [0, 1],
        [-1.0, -2.0],
        [3, 3],
        1,
        None,  # a segment cut at its own length: unfinished
    )
    assert s.token_ids == []  # the input is not changed
    seg = Completion(prompt_index=0, token_ids=[2, 2, 0], logprobs=[-3.0, -4.0, -5.0], text="", finish_reason="length")
    s2 = splice(s1, seg, 4, 5)
    assert (s2.versions, s2.logprobs, s2.finish_reason) == ([3, 3, 4, 4, 4], [-1.0, -2.0, -3.0, -4.0, -5.0], "length")
    s3 = splice(s1, Completion(prompt_index=0, token_ids=[EOS], logprobs=[0.0], text="", finish_reason="stop"), 4, 5)
    assert (s3.token_ids, s3.finish_reason) == ([0, 1, EOS], "stop")
    with pytest.raises(ValueError, match="an empty segment that did not stop"):
        splice(s1, Completion(prompt_index=0, token_ids=[], logprobs=[], text="", finish_reason="abort"), 4, 5)
    with pytest.raises(ValueError, match="already finished"):
        splice(s3, seg, 4, 5)
    with pytest.raises(ValueError, match="exceed max_new_tokens"):
        splice(
            s1, Completion(prompt_index=0, token_ids=[0] * 4, logprobs=[0.0] * 4, text="", finish_reason="length"), 4, 5
        )


def test_one_segment_samples_what_a_whole_response_request_samples():
    engine = FakeEngine()
    whole = engine.generate([[7], [5]], 2, SAMPLING)
    pool = PartialPool()
    pool.add(["a", "b"], [[7], [5]], 2, SAMPLING.seed)
    answer, counts = pool.run(engine_generate(engine), 2, SAMPLING, segment_tokens=5, version=0)
    assert [k for k, _ in answer] == ["a", "b"] and counts == {
        "segments": 1.0,
        "carried_groups": 0.0,
        "ready_groups": 0.0,
    }
    for (_, got), want in zip(answer, whole):
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.logprobs for c in got] == [c.logprobs for c in want]


def run_two_requests(with_c: bool):
    """Request 1 at version 0: groups A (short) and B (long), one group wanted, 2-token segments.
    Then the weights move to version 1 while B is unfinished; request 2 (adds C when `with_c`)."""
    engine = FakeEngine()
    pool = PartialPool()
    pool.add(["A", "B"], [[7], [5]], 2, SAMPLING.seed)
    first, c1 = pool.run(engine_generate(engine), 1, SAMPLING, segment_tokens=2, version=0)
    carried = [list(s.token_ids) for s in pool.groups[0].samples]
    engine.weights_version = 1  # the weight update, mid-generation for B
    if with_c:
        pool.add(["C"], [[7]], 2, SAMPLING.seed + 1)
    second, c2 = pool.run(engine_generate(engine), 1 + with_c, SAMPLING, segment_tokens=2, version=1)
    if with_c:  # each request's first generate starts from an empty prefix cache, its later ones reuse it
        assert engine.fresh == [True, True, False]
    return first, c1, carried, second, c2


def test_a_weight_update_mid_generation_continues_the_unfinished_group_under_the_new_weights():
    first, c1, carried, second, c2 = run_two_requests(with_c=True)
    # Request 1 answers A (done in one segment); B waits in the pool with 2 tokens per sample.
    assert [k for k, _ in first] == ["A"] and c1 == {"segments": 1.0, "carried_groups": 1.0, "ready_groups": 0.0}
    assert [c.token_versions for c in first[0][1]] == [[0], [0]] and all(len(t) == 2 for t in carried)
    # Request 2: B (oldest first), then C. B: segment 2 (2 tokens) and 3 (1 token: the budget's rest).
    assert [k for k, _ in second] == ["B", "C"] and c2 == {"segments": 2.0, "carried_groups": 0.0, "ready_groups": 0.0}
    for j, c in enumerate(second[0][1]):
        # (a) the versions recorded per token
        assert c.token_versions == [0, 0, 1, 1, 1] and c.weight_version == 1 and c.finish_reason == "length"
        assert c.token_ids[:2] == carried[j]  # the paused tokens are kept, not re-sampled
        # (b) the continuation was sampled by the new weights: its behaviour log-probs are version 1's
        # on those tokens, and differ from version 0's on every one of them.
        assert c.logprobs[:2] == lp(0, c.token_ids[:2])
        assert c.logprobs[2:] == lp(1, c.token_ids[2:])
        assert all(a != b for a, b in zip(c.logprobs[2:], lp(0, c.token_ids[2:])))
    # The two samples of B were seeded apart.
    assert second[0][1][0].token_ids != second[0][1][1].token_ids


def test_a_continuation_is_seeded_by_its_sample_and_segment_only():
    _, _, _, with_c, _ = run_two_requests(with_c=True)
    _, _, _, without_c, _ = run_two_requests(with_c=False)
    assert [c.token_ids for c in with_c[0][1]] == [c.token_ids for c in without_c[0][1]]
    base = request_seed(SAMPLING.seed, 1, 2)  # B is prompt 1 of its request; sample j adds j
    assert segment_seed(base, 0) == base and segment_seed(base, 1) != base
    # B's sample 0, segment 1 (its second), redrawn by hand with that seed under version 1:
    engine = FakeEngine()
    engine.weights_version = 1
    prefix = with_c[0][1][0].token_ids[:2]
    seg = engine.generate([[5, *prefix]], 1, SamplingConfig(max_new_tokens=2, seed=0), seeds=[segment_seed(base, 1)])
    assert with_c[0][1][0].token_ids[2:4] == seg[0][0].token_ids
