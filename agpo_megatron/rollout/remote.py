"""A rollout engine on other ranks: the trainer's side (`RemoteRollout`) and the rollout ranks' (`serve`).

With `rollout.placement=disaggregated` (runtime/placement.py) the trainer ranks hold no engine. They
hold a `RemoteRollout`, which implements `RolloutEngine` by sending requests over the link to the
rollout ranks, where `serve` runs a real engine (vLLM) and answers:

    trainer leader (link rank 0)              rollout ranks (link ranks 1..R)
    ("generate", prompts, n, sampling)  ->    engine.generate (their own replicas, same seeds)
                                        <-    completions, from link rank 1, tagged with the weight version
    ("partial", keys, prompts, n,       ->    PartialPool: add the groups, run segments until `want`
     sampling, want, segment_tokens)          groups are complete (rollout/partial.py)
                                        <-    (key, completions) of the complete groups, pool counts
    ("weights", version)                ->
    bucket header, bucket bytes ...     ->    engine.update_weights(lazy stream of the buckets)
    ("stop",)                           ->    serve returns

Every trainer rank calls every method (it is an SPMD engine, like the colocated one): only the
leader talks to the link; the others run the weight stream's gathers (the iterator handed to
`update_weights` is collective over the trainer world) and receive the completions from the leader.

Requests and their answers are split (`submit` / `collect`) so that a request can be answered while
the trainer computes (train/async_loop.py). The link carries one conversation at a time: between a
`submit` and its `collect` the trainer leader may not send anything else.

Partial rollouts (`submit_partial`): the rollout ranks keep the unfinished groups between requests,
so the weights that arrive between two requests sample the rest of them (rollout/partial.py).

Seeds. A request carries the same `SamplingConfig` (seed included) a colocated engine would get, and
every prompt's seed depends only on it and the prompt's global index (rollout/replicas.py), so the
samples do not depend on the placement or on how many rollout ranks split the prompts.

Weights. Full HF tensors arrive from `bridge.export.sync_weights` (its TP/PP gather); the leader
packs them into byte buckets of `bucket_bytes` (the bridge's bucket size) and sends each as one
header (names, dtypes, shapes) and one flat byte buffer, so the rollout ranks get every bit exactly.
An engine records the version (the trainer step its weights come from) in `weights_version`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from agpo_megatron.rollout.base import Completion, RolloutEngine, SamplingConfig
from agpo_megatron.rollout.partial import PartialPool, engine_generate
from agpo_megatron.runtime.placement import Link, LinkError

DEFAULT_BUCKET_BYTES = 512 * 2**20
"""The bridge's bucket size (bridge/export.py DEFAULT_BUCKET_BYTES; this layer may not import it)."""

LEADER = 0
"""Link rank of the trainer leader (world rank 0)."""
ANSWERS = 1
"""Link rank that sends the rollout side's answers (the first rollout rank)."""


class RemoteRollout:
    """`RolloutEngine` on the trainer ranks, served by the rollout ranks (collective over the trainer world)."""

    shares_device = False
    """The engine lives on other devices: nothing to hand over before or after training (train/colocate.py)."""

    def __init__(self, link: Link | None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, step_timeout_s: float = 0):
        """`step_timeout_s`: once the first weights are on the rollout ranks (start-up is over), no link
        operation may wait longer (parallel.step_timeout_s; 0 keeps the start-up timeout)."""
        self.link, self.bucket_bytes, self.step_timeout_s = link, bucket_bytes, step_timeout_s
        self.weights_version = 0
        """The trainer step the engine's weights come from (set before `update_weights`)."""
        self.pushed_version: int | None = None
        """The version the rollout ranks hold (None before the first sync)."""
        self._pending = False

    @property
    def leader(self) -> bool:
        return self.link is not None

    def submit(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> None:
        """Send a generate request; the rollout ranks start on it at once. Answer with `collect`."""
        if self._pending:
            raise RuntimeError("RemoteRollout.submit while a request is unanswered: collect() it first")
        if self.link is not None:
            self.link.broadcast_object(("generate", prompts, n, sampling), LEADER)
        self._pending = True

    def submit_partial(
        self,
        keys: list[Any],
        prompts: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        *,
        want: int,
        segment_tokens: int,
    ) -> None:
        """Add groups to the rollout side's pool of partial rollouts and ask for `want` complete groups
        (rollout/partial.py); `collect` answers `([(key, completions)], counts)`."""
        if self._pending:
            raise RuntimeError("RemoteRollout.submit_partial while a request is unanswered: collect() it first")
        if self.link is not None:
            self.link.broadcast_object(("partial", keys, prompts, n, sampling, want, segment_tokens), LEADER)
        self._pending = True

    def collect(self) -> Any:
        """The answer to the submitted request, on every trainer rank (blocks until it is done): the
        completions of `submit`, or `submit_partial`'s complete groups and counts."""
        if not self._pending:
            raise RuntimeError("RemoteRollout.collect without a submitted request")
        self._pending = False
        out: Any = [self.link.broadcast_object(None, ANSWERS) if self.link is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(out, src=0)  # trainer world rank 0 is the leader
        return out[0]

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        self.submit(prompts, n, sampling)
        return self.collect()

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send every weight at `weights_version` (all trainer ranks pull `weights`: it may be collective).

        The same version twice (a checkpoint save's hand-back) sends nothing: the rollout ranks hold it.
        """
        if self._pending:
            raise RuntimeError("RemoteRollout.update_weights while a request is unanswered: collect() it first")
        if self.pushed_version == self.weights_version:
            for _ in weights:
                pass
            return
        link = self.link
        if link is not None:
            link.broadcast_object(("weights", self.weights_version), LEADER)
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, t in weights:
            if link is None:
                continue
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                _send_bucket(link, bucket)
                bucket, size = [], 0
        if link is not None:
            if bucket:
                _send_bucket(link, bucket)
            link.broadcast_object(None, LEADER)  # end of the weights
            link.set_timeout(self.step_timeout_s)
        self.pushed_version = self.weights_version

    def sleep(self) -> None:
        """Nothing to free: the engine is on the rollout ranks' devices."""

    def wake_weights(self) -> None:
        """Nothing to map back (see `sleep`)."""

    def wake_kv_cache(self) -> None:
        """Nothing to re-allocate (see `sleep`)."""

    def close(self) -> None:
        """Stop the rollout ranks' `serve` loop (they then leave the job). Idempotent.

        After a failure mid-request (or of the link itself) nothing is sent: the rollout ranks' link
        timeout ends them instead."""
        link, self.link = self.link, None
        if link is not None and not self._pending:
            try:
                link.broadcast_object(("stop",), LEADER)
            except LinkError:
                pass


def _send_bucket(link: Link, bucket: list[tuple[str, torch.Tensor]]) -> None:
    header = [(name, t.dtype, tuple(t.shape)) for name, t in bucket]
    link.broadcast_object(header, LEADER)
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])
    link.broadcast(flat.to(link.device), LEADER)


def _recv_weights(link: Link) -> Iterator[tuple[str, torch.Tensor]]:
    """The rollout side of `update_weights`: one bucket in flight, its tensors handed over one by one."""
    while True:
        header: Any = link.broadcast_object(None, LEADER)
        if header is None:
            return
        nbytes = [torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in header]
        flat = link.broadcast(torch.empty(sum(nbytes), dtype=torch.uint8, device=link.device), LEADER)
        offset = 0
        for (name, dtype, shape), n in zip(header, nbytes, strict=True):
            yield name, flat[offset : offset + n].view(dtype).reshape(shape)
            offset += n


def serve(engine: RolloutEngine, link: Link, *, step_timeout_s: float = 0, on_request: Any = None) -> int:
    """Answer the trainer leader's requests with `engine` until it says stop; returns the requests served.

    Run on every rollout rank (the engine's generate is collective over the rollout world). After the
    first weights, a trainer silent for longer than `step_timeout_s` (0: the start-up timeout) fails
    the link. `on_request(kind)` is called before each request.
    """
    served = 0
    pool = PartialPool()
    while True:
        request: Any = link.broadcast_object(None, LEADER)
        kind = request[0]
        if on_request is not None:
            on_request(kind)
        if kind == "stop":
            return served
        if kind == "generate":
            _, prompts, n, sampling = request
            out = engine.generate(prompts, n, sampling)
            version = getattr(engine, "weights_version", None)
            for group in out:
                for c in group:
                    c.weight_version = version
            link.broadcast_object(out if link.rank == ANSWERS else None, ANSWERS)
        elif kind == "partial":
            _, keys, prompts, n, sampling, want, segment_tokens = request
            pool.add(keys, prompts, n, sampling.seed)
            version = int(getattr(engine, "weights_version", 0))
            detokenize = getattr(engine, "detokenize", None)
            answer = pool.run(engine_generate(engine), want, sampling, segment_tokens, version, detokenize)
            link.broadcast_object(answer if link.rank == ANSWERS else None, ANSWERS)
        elif kind == "weights":
            stream = _recv_weights(link)
            engine.update_weights(stream)
            for _ in stream:  # an engine that stopped early must not leave buckets on the link
                pass
            engine.weights_version = request[1]  # type: ignore[attr-defined]
            link.set_timeout(step_timeout_s)
        else:
            raise ValueError(f"unknown rollout request {kind!r}")
        served += 1
