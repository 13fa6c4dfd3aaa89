"""Partial rollouts: generation in segments, unfinished groups carried over to the next weights.

With `rollout.partial=true` (disaggregated, staleness >= 1) the rollout ranks keep a pool of groups
in progress (`PartialPool`). A request brings P new prompts and asks for P complete groups:

    pool = groups carried from earlier requests + the P new ones
    until P groups are complete:
        one segment for every unfinished sample: at most `rollout.segment_tokens` more tokens,
        sampled from prompt + the tokens generated so far, with the engine's current weights
    answer the P oldest complete groups; the unfinished ones wait in the pool

The next request comes after the trainer's weight sync, so the carried samples continue under the
new weights (the partial rollouts of slime and Kimi k1.5; MindSpeed-RL's and Agent Lightning's
asynchronous collection also answer a batch once enough groups complete and carry the rest). The
point is the long tail: a step no longer waits for its longest responses; they finish during later
steps while other groups fill the batches.

Per token. Every generated token keeps the weight version that sampled it and its behaviour log-prob
(the engine's sampling log-prob in the segment that produced it): `Completion.token_versions` and
`Completion.logprobs`, spliced segment by segment (`splice`). The trainer's off-policy correction
(algo/correction.py) then weighs each token by proximal over *its own* behaviour log-prob.

Seeds. Each sample has a seed of its own: segment 0 uses the seed a whole-response request would give
it (rollout/replicas.py `request_seed` + its sample index), and segment s > 0 a seed derived from that
one and s (`segment_seed`), so a continuation samples the same tokens whatever else is in the pool.

The trainer side (train/async_loop.py `Requests`) fills the pool with a spare batch at its first
request, so the pool always holds a batch more than it answers: without it every request would wait
for all of its groups, and nothing would ever be paused.

Departures: the carried tokens are not re-sampled or re-scored under the new weights (the
off-policy correction weighs them by their own behaviour log-probs instead). A continuation re-reads
its prefix: within a request from vLLM's prefix cache (only a request's first generate resets it),
after a weight update by recomputing it (the cached KV belongs to the old weights; `update_weights`
drops it). A group counts as sampled by the version that finished it (the staleness queue's
`Group.version`); its older tokens are reported as per-token ages (`async/token_age_*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.replicas import SEED_MOD, request_seed

_SEGMENT_SEED_STRIDE = 7_919_993
"""Spacing between a sample's segment seeds (a prime, unlike replicas.py's strides)."""


def segment_seed(base: int, segment: int) -> int:
    """The seed of a sample's `segment`-th segment: its whole-response seed for segment 0."""
    return (base + segment * _SEGMENT_SEED_STRIDE) % SEED_MOD


@dataclasses.dataclass
class Sample:
    """One response in progress."""

    prompt_ids: list[int]
    """Its prompt (a continuation is conditioned on prompt_ids + token_ids)."""
    seed: int
    """Its segment-0 seed (`segment_seed` derives the others)."""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    """The response so far."""
    logprobs: list[float] = dataclasses.field(default_factory=list)
    """Each token's behaviour log-prob: the engine's sampling log-prob in the segment that sampled it."""
    versions: list[int] = dataclasses.field(default_factory=list)
    """The weight version that sampled each token of `token_ids`."""
    segments: int = 0
    """Segments generated so far (the next one's seed: `segment_seed(seed, segments)`)."""
    finish_reason: str | None = None
    """None while unfinished; 'stop' or 'length' (max_new_tokens) when done."""


def splice(sample: Sample, segment: Completion, version: int, max_new_tokens: int) -> Sample:
    """`sample` continued by one segment sampled at `version` (a new Sample; the input is not changed).

    The segment's tokens and log-probs are appended, each token tagged with `version`. The sample is
    finished when the segment stopped ('stop': EOS or a stop token) or the response reached
    `max_new_tokens`; a segment cut at its own length ('length' below the budget) leaves it unfinished.
    """
    if sample.finish_reason is not None:
        raise ValueError("splice: the sample is already finished")
    if segment.logprobs is None:
        raise ValueError("splice: partial rollouts need the segment's sampling log-probs")
    if not segment.token_ids and segment.finish_reason != "stop":  # it would be continued forever
        raise ValueError(f"splice: an empty segment that did not stop ({segment.finish_reason!r})")
    tokens = sample.token_ids + list(segment.token_ids)
    if len(tokens) > max_new_tokens:
        raise ValueError(f"splice: {len(tokens)} tokens exceed max_new_tokens={max_new_tokens}")
    finish = "stop" if segment.finish_reason == "stop" else ("length" if len(tokens) == max_new_tokens else None)
    return dataclasses.replace(
        sample,
        token_ids=tokens,
        logprobs=sample.logprobs + list(segment.logprobs),
        versions=sample.versions + [version] * len(segment.token_ids),
        segments=sample.segments + 1,
        finish_reason=finish,
    )


@dataclasses.dataclass
class PoolGroup:
    """One prompt's G samples in the pool; complete when every sample is finished."""

    key: Hashable
    """The trainer's name for the group (it maps the answer back to its prompt)."""
    samples: list[Sample]
    """Its G responses in progress, in sample order."""

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class PartialPool:
    """The rollout side's groups in progress (module doc). Deterministic: every rollout rank holds the
    same pool, since every request and every generate result is the same on all of them."""

    def __init__(self) -> None:
        self.groups: list[PoolGroup] = []

    def add(self, keys: list[Hashable], prompts: list[list[int]], n: int, seed: int) -> None:
        """New groups of `n` samples; sample j of prompt i (of this request) gets the seed a whole-response
        request would give it."""
        for i, (key, prompt) in enumerate(zip(keys, prompts, strict=True)):
            base = request_seed(seed, i, n)
            self.groups.append(PoolGroup(key, [Sample(list(prompt), (base + j) % SEED_MOD) for j in range(n)]))

    def run(
        self,
        generate: Callable[[list[list[int]], SamplingConfig, list[int], bool], list[Completion]],
        want: int,
        sampling: SamplingConfig,
        segment_tokens: int,
        version: int,
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> tuple[list[tuple[Hashable, list[Completion]]], dict[str, float]]:
        """Segments until `want` groups are complete; those groups (oldest first) as completions, and counts.

        `generate(prompts, sampling, seeds, fresh)` samples one completion per prompt with the given
        seeds (`sampling.max_new_tokens` is set to the segment's budget); `fresh` is true for this
        call's first generate only: the later ones may reuse the KV the earlier ones cached (same
        weights). `version` is the engine's weight version. Counts: `segments` run by this call,
        `carried_groups` left unfinished in the pool, `ready_groups` complete but not answered (more
        than `want` completed in the last segment).
        """
        segments = calls = 0
        while sum(g.done for g in self.groups) < want and any(not g.done for g in self.groups):
            todo = [(g, j) for g in self.groups for j, s in enumerate(g.samples) if s.finish_reason is None]
            # One call per segment budget (the samples near max_new_tokens get what they have left).
            by_budget: dict[int, list[tuple[PoolGroup, int]]] = {}
            for g, j in todo:
                left = sampling.max_new_tokens - len(g.samples[j].token_ids)
                by_budget.setdefault(min(segment_tokens, left), []).append((g, j))
            for budget, items in sorted(by_budget.items()):
                seg_sampling = dataclasses.replace(sampling, max_new_tokens=budget, logprobs=True)
                prompts = [g.samples[j].prompt_ids + g.samples[j].token_ids for g, j in items]
                seeds = [segment_seed(g.samples[j].seed, g.samples[j].segments) for g, j in items]
                out = generate(prompts, seg_sampling, seeds, calls == 0)
                calls += 1
                for (g, j), c in zip(items, out, strict=True):
                    g.samples[j] = splice(g.samples[j], c, version, sampling.max_new_tokens)
            segments += 1
        done = [g for g in self.groups if g.done][:want]
        taken = {id(g) for g in done}
        self.groups = [g for g in self.groups if id(g) not in taken]
        answer = [(g.key, [_completion(s, i, detokenize) for s in g.samples]) for i, g in enumerate(done)]
        unfinished = sum(not g.done for g in self.groups)
        counts = {"segments": float(segments), "carried_groups": float(unfinished)}
        counts["ready_groups"] = float(len(self.groups) - unfinished)
        return answer, counts


def _completion(s: Sample, index: int, detokenize: Callable[[list[int]], str] | None) -> Completion:
    """A finished sample; `index`: its group's place in the answer."""
    return Completion(
        prompt_index=index,
        token_ids=s.token_ids,
        logprobs=s.logprobs,
        text=detokenize(s.token_ids) if detokenize is not None else "",
        finish_reason=str(s.finish_reason),
        weight_version=max(s.versions) if s.versions else None,
        token_versions=s.versions,
    )


def engine_generate(engine: Any) -> Callable[[list[list[int]], SamplingConfig, list[int], bool], list[Completion]]:
    """`PartialPool.run`'s `generate` from a `RolloutEngine` whose generate takes per-prompt `seeds` and
    `fresh_cache` (`VLLMEngine.generate`)."""

    def generate(prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int], fresh: bool) -> list[Completion]:
        return [group[0] for group in engine.generate(prompts, 1, sampling, seeds=seeds, fresh_cache=fresh)]

    return generate
