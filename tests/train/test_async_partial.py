"""The trainer's side of partial rollouts (train/async_loop.py `Requests`) against an in-process pool:
the first request brings a spare batch, answers map back to their prompts by key, a group counts as
sampled by the weights that finished it, and the queue receives whole groups. No processes: the
"remote" engine runs rollout/partial.py's pool on tests/rollout/test_partial.py's fake engine."""

from types import SimpleNamespace

from agpo_megatron.data.datasets import Example, PromptSampler
from agpo_megatron.rollout.base import SamplingConfig
from agpo_megatron.rollout.partial import PartialPool, engine_generate
from agpo_megatron.rollout.remote import RemoteRollout
from agpo_megatron.train.async_loop import Requests, StalenessQueue
from tests.rollout.test_partial import FakeEngine

P, G = 2, 2  # prompts per batch, responses per group


class InProcessRemote(RemoteRollout):
    """`RemoteRollout` whose rollout side is a pool in this process (what `serve` does with a request)."""

    def __init__(self):
        super().__init__(None)
        self.engine, self.pool, self.requests = FakeEngine(), PartialPool(), []

    def submit_partial(self, keys, prompts, n, sampling, *, want, segment_tokens):
        self.requests.append((list(keys), want))
        self.pool.add(keys, prompts, n, sampling.seed)
        self._answer = self.pool.run(
            engine_generate(self.engine), want, sampling, segment_tokens, self.engine.weights_version
        )

    def collect(self):
        return self._answer


def test_requests_keep_a_spare_batch_and_map_answers_to_their_prompts():
    # The sampler's draw order (it depends only on the count and the seed): drawn prompts 0, 2, 4 are
    # short ([7, .]: EOS at once), 1, 3, 5 long ([5, .]: 5 tokens, in 2-token segments).
    probe = PromptSampler([Example([0], "", "", i) for i in range(8)], batch_size=P, seed=0)
    drawn = [ex.index for _ in range(3) for ex in next(probe)]
    short = {drawn[k] for k in (0, 2, 4)}
    examples = [Example(prompt_ids=[7 if i in short else 5, i], prompt_text="", gold="", index=i) for i in range(8)]
    remote = InProcessRemote()
    cfg = SimpleNamespace(rollout=SimpleNamespace(partial=True, segment_tokens=2), algo=SimpleNamespace(group_size=G))
    session = SimpleNamespace(
        rollout=remote, cfg=cfg, train_sampling=lambda step: SamplingConfig(max_new_tokens=5, seed=100 + step)
    )
    queue = StalenessQueue(2, capacity=3 * P)
    requests = Requests(session, PromptSampler(examples, batch_size=P, seed=0), queue, first=1, total=3)

    # Request 1 (version 0) carries two batches, P + the spare P, and asks for P complete groups: the
    # two short ones, after one segment. The long ones wait in the pool with 2 tokens per response.
    assert requests.submit()
    requests.collect()
    assert remote.requests[0] == ([0, 1, 2, 3], P)
    assert [g.example.index for g in queue.groups] == [drawn[0], drawn[2]]  # mapped back by key
    assert all(g.version == 0 and [c.token_ids for c in g.completions] == [[3]] * G for g in queue.groups)
    assert requests.pool_metrics == {"segments": 1.0, "carried_groups": 2.0, "ready_groups": 0.0}
    assert sorted(requests.unanswered) == [1, 3]

    # The sync between requests (version 1); request 2 brings P new prompts (keys 4, 5). Segment 1 ends
    # the short key 4, segment 2 the long keys 1 and 3 (at 5 tokens): the pool answers the oldest two.
    queue.pop(P, version=1)
    remote.engine.weights_version = 1
    assert requests.submit()
    requests.collect()
    assert remote.requests[1] == ([4, 5], P)
    assert [g.example.index for g in queue.groups] == [drawn[1], drawn[3]]
    for g in queue.groups:  # finished by version 1: the group's version; its first 2 tokens are version 0's
        assert g.version == 1 and all(c.token_versions == [0, 0, 1, 1, 1] for c in g.completions)
    assert requests.pool_metrics == {"segments": 2.0, "carried_groups": 1.0, "ready_groups": 1.0}
    assert sorted(requests.unanswered) == [4, 5]  # the pool holds one batch more than it answers
