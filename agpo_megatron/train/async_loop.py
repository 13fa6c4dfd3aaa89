"""The asynchronous loop: rollout ranks generate the next batch while the trainer trains on this one.

    rollout.max_staleness = S >= 1, rollout.placement = disaggregated (train/disaggregated.py)

    start:   S batches sampled with the starting weights, into the queue (nothing to overlap yet)
    step k:  pop one batch of whole groups from the queue (too old ones dropped)
             submit the next request to the rollout ranks, at the weights of step k-1  --+
             reward -> advantage -> log-probs -> update  (the trainer)                   | overlap
             collect that request's groups into the queue                              --+
             weight sync (version k) -> log -> (evaluate, checkpoint)

So a group trained at step k was sampled from the weights of step k-1-S at the oldest: at S = 1,
generating step k+1 overlaps training step k (one step off policy). Every group carries the weight
version that sampled it (`Completion.weight_version`); `StalenessQueue` keeps whole groups, drops
any older than S and reports what it dropped and reused, and the ages (`async/` metrics). The
groups stay whole: the batch's rewards and advantages are computed by `rollout_rounds.collect` on
complete groups, exactly as in the synchronous loop.

Seeds: request i draws the i-th prompt batch of the sampler and the sampling seed of the step that
will train it (`Session.train_sampling`), as the synchronous loop does, so only the weights that
sample differ between staleness settings.

The loss sees stale groups through the old log-probs: with `rollout.logprob_mode=recompute` they
are the proximal policy's (the trainer's weights before this update); `algo.loss.rollout_correction`
(tis / mis) weighs them by proximal over behaviour (the engine's sampling log-probs), algo/correction.py.

Partial rollouts (`rollout.partial`, rollout/partial.py). A request then adds its P prompts to the
rollout ranks' pool of groups in progress and is answered with the first P groups to complete (the
first request adds a spare batch, 2P prompts, so the pool always holds P groups more than it
answers). The rollout ranks generate in segments of `rollout.segment_tokens`; the unfinished groups
wait in the pool and continue in the next request, after the weight sync, under the new weights. A
step therefore waits for the P fastest of 2P groups, not for the longest response. Every token keeps
its version and behaviour log-prob (`Completion.token_versions`, `logprobs`), which the correction
uses per token; `async/token_age_mean` / `token_age_max` and `paused_token_frac` (tokens sampled
before a pause) report them, `async/segments`, `carried_groups` (unfinished in the pool) and
`ready_groups` (complete, answered next time) the pool. A group counts as sampled by the weights
that finished it. One that completed in the same segment as a full batch waits a request on the
rollout ranks, so with partial rollouts the queue keeps groups up to S + 1 versions old; the paused
tokens are older still (up to S + 1 + the requests the group was carried over). The prompts the pool
holds at the end (or at a save) are not trained.

Departures and limits (issue 21):
- The link carries one conversation at a time (rollout/remote.py), so one request is in flight per
  step; S > 1 deepens the queue (the prefill) but overlaps no more than S = 1. A continuously
  generating rollout side (fully asynchronous) is not built: the pool only moves while a request is
  open, and weights arrive between requests, never inside one.
- With this schedule no group ever gets older than S (S + 1 partial), so nothing is dropped in
  practice; the queue's drop rule is what guarantees it (tests/train/test_async_loop.py).
- DAPO's dynamic sampling is refused with S > 0 (one round per step here).
- Resume with S > 0: groups queued at the save (and the partial pool) are not saved, and their
  prompts are not drawn again (the saved sampler is past them); the resumed run fills its queue from
  the saved weights (version: the saved step): tests/train/test_disaggregated.py.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

from agpo_megatron.algo.controllers import clip_controller, kl_controller
from agpo_megatron.bridge.export import sync_weights
from agpo_megatron.config.yaml_io import to_dict
from agpo_megatron.data.datasets import Example, PromptSampler
from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.report.console import console
from agpo_megatron.report.metrics import MetricsLogger, PhaseTimer, step_row
from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.remote import RemoteRollout
from agpo_megatron.runtime import preempt
from agpo_megatron.runtime.parallel import set_collective_timeout
from agpo_megatron.runtime.watchdog import StepWatchdog
from agpo_megatron.train import batch as batching
from agpo_megatron.train import ppo, rollout_rounds
from agpo_megatron.train.colocate import Colocation
from agpo_megatron.train.offload import ActorMemory
from agpo_megatron.train.policy import Actor
from agpo_megatron.train.run_checkpoint import RunCheckpointer
from agpo_megatron.train.session import Session


@dataclasses.dataclass
class Group:
    """One prompt and its G completions, sampled together from one weight version."""

    example: Example
    completions: list[Completion]
    version: int
    """The trainer step whose weights sampled it."""


class StalenessQueue:
    """A bounded FIFO of whole groups tagged with their weight version.

    `pop(n, version)` first drops every group older than `max_staleness` versions (counted), then
    takes the n oldest. `push` beyond `capacity` groups drops the oldest (counted too).
    """

    def __init__(self, max_staleness: int, capacity: int):
        if max_staleness < 0 or capacity < 1:
            raise ValueError(f"max_staleness must be >= 0 and capacity >= 1, got {max_staleness}, {capacity}")
        self.max_staleness, self.capacity = max_staleness, capacity
        self.groups: collections.deque[Group] = collections.deque()
        self.dropped = 0
        """Groups dropped since the last `pop` (too old, or pushed out by a full queue)."""

    def __len__(self) -> int:
        return len(self.groups)

    def push(self, groups: list[Group]) -> None:
        for g in groups:
            if len(self.groups) == self.capacity:
                self.groups.popleft()
                self.dropped += 1
            self.groups.append(g)

    def pop(self, n: int, version: int) -> tuple[list[Group], dict[str, float]]:
        """Up to `n` groups for a trainer at `version`, and the step's `async/` metrics:
        `dropped_groups`, `reused_groups` (trained at a newer version than sampled them: off policy),
        `age_mean` / `age_max` (versions between sampling and training), `queued_groups` (left)."""
        while self.groups and version - self.groups[0].version > self.max_staleness:
            self.groups.popleft()
            self.dropped += 1
        # FIFO and versions never decrease: once the head is fresh enough, all are.
        out = [self.groups.popleft() for _ in range(min(n, len(self.groups)))]
        ages = [version - g.version for g in out]
        metrics = {
            "dropped_groups": float(self.dropped),
            "reused_groups": float(sum(a > 0 for a in ages)),
            "age_mean": sum(ages) / len(ages) if ages else 0.0,
            "age_max": float(max(ages, default=0)),
            "queued_groups": float(len(self.groups)),
            "weights_version": float(version),
            **token_ages(out, version),
        }
        self.dropped = 0
        return out, metrics


def token_ages(groups: list[Group], version: int) -> dict[str, float]:
    """Per-token ages for a trainer at `version`: `token_age_mean` / `token_age_max` (versions between
    sampling a token and training on it) and `paused_token_frac`, the share of response tokens sampled
    by older weights than the ones that finished their response (partial rollouts: the tokens before
    a pause). A response without `token_versions` was sampled by its group's version alone."""
    ages: list[int] = []
    paused = 0
    for g in groups:
        for c in g.completions:
            vs = c.token_versions if c.token_versions is not None else [g.version] * len(c.token_ids)
            ages += [version - v for v in vs]
            newest = max(vs, default=0)  # once per response, not per token
            paused += sum(v < newest for v in vs)
    n = max(len(ages), 1)
    return {
        "token_age_mean": sum(ages) / n,
        "token_age_max": float(max(ages, default=0)),
        "paused_token_frac": paused / n,
    }


class _Sampled:
    """A `RolloutEngine` stand-in that hands `rollout_rounds.collect` groups sampled earlier."""

    def __init__(self, groups: list[Group]):
        self.groups = groups

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        assert prompts == [g.example.prompt_ids for g in self.groups]
        assert all(len(g.completions) == n for g in self.groups)
        return [g.completions for g in self.groups]


class Requests:
    """The trainer's side of the rollout requests: prompt batches in sampler order, each with the
    sampling seed of the step that will train it, answered into the queue."""

    def __init__(self, session: Session, sampler: PromptSampler, queue: StalenessQueue, first: int, total: int):
        assert isinstance(session.rollout, RemoteRollout)
        self.s, self.remote, self.sampler, self.queue = session, session.rollout, sampler, queue
        self.next_step, self.last_step = first, first + total - 1
        self.in_flight: list[Example] | None = None
        self.partial = session.cfg.rollout.partial
        self.unanswered: dict[int, Example] = {}
        """Partial rollouts: the prompts the rollout ranks hold, by key (the order they were drawn in)."""
        self.pool_metrics: dict[str, float] = {}
        """The last partial answer's counts (`segments`, `carried_groups`; rollout/partial.py)."""
        self._keys = 0

    def submit(self) -> bool:
        """Ask for the next batch (False: every step's batch was asked for already)."""
        if self.next_step > self.last_step:
            return False
        batch = next(self.sampler)
        cfg, sampling = self.s.cfg, self.s.train_sampling(self.next_step)
        G = cfg.algo.group_size
        if self.partial:  # P new groups into the rollout ranks' pool; the answer: P complete groups
            want = len(batch)
            if self._keys == 0:  # the first request fills the pool with one batch to spare (module doc)
                batch = batch + next(self.sampler)
            keys = list(range(self._keys, self._keys + len(batch)))
            self._keys += len(batch)
            self.unanswered.update(zip(keys, batch, strict=True))
            prompts = [ex.prompt_ids for ex in batch]
            self.remote.submit_partial(keys, prompts, G, sampling, want=want, segment_tokens=cfg.rollout.segment_tokens)
        else:
            self.remote.submit([ex.prompt_ids for ex in batch], G, sampling)
        self.in_flight, self.next_step = batch, self.next_step + 1
        return True

    def collect(self) -> None:
        """The submitted batch's groups into the queue (blocks until the rollout ranks are done)."""
        if self.in_flight is None:
            self.pool_metrics = {}
            return
        out, batch = self.remote.collect(), self.in_flight
        self.in_flight, self.pool_metrics = None, {}
        if self.partial:
            answer, self.pool_metrics = out
            groups = []
            for key, completions in answer:
                # A group counts as sampled by the weights that finished it; its older tokens carry their own.
                version = max(int(c.weight_version or 0) for c in completions)
                groups.append(Group(self.unanswered.pop(key), completions, version))
            self.queue.push(groups)
            return
        versions = {c.weight_version for group in out for c in group}
        assert len(versions) == 1 and None not in versions, f"one request, one weight version: got {versions}"
        version = int(versions.pop() or 0)
        self.queue.push([Group(ex, group, version) for ex, group in zip(batch, out, strict=True)])


def train_async(session: Session, actor: Actor | None = None) -> dict[str, Any]:
    """`trainer.train` with the rollout of the next steps overlapping training (module doc)."""
    preempt.install()
    s, cfg = session, session.cfg
    S, P, G, T = cfg.rollout.max_staleness, cfg.batch.prompts_per_rollout, cfg.algo.group_size, cfg.rollout.temperature
    warm_start = actor is not None
    actor = actor or Actor(s.arch, cfg, s.layout, total_steps=cfg.optimizer_steps())
    loss_cfg = cfg.algo.loss
    needs_ref = loss_cfg.kl_coef > 0 or cfg.algo.adaptive_kl_target is not None
    kl_ctl = kl_controller(cfg.algo.kl_settings(), loss_cfg.kl_coef)
    clip_ctl = clip_controller(cfg.algo.clip_settings(), (loss_cfg.eps_low, loss_cfg.eps_high))
    sampler = PromptSampler(s.train_examples, batch_size=P, seed=cfg.parallel.seed)
    colo = Colocation(  # the engine is remote: each hand-over is only the versioned sync
        s.rollout,
        ActorMemory(actor.chunks, actor.optimizer, cfg.offload),
        sync=lambda: sync_weights(actor.chunks, s.arch, s.rollout, version=colo.version),
    )
    ckpt = RunCheckpointer(cfg, s.layout, actor, sampler, kl_ctl, clip_ctl, resident=colo.actor_resident)
    reference = ckpt.reference(s.arch, warm_start=warm_start) if needs_ref else None
    first, kl_coef, eps = ckpt.resume()
    colo.start(version=first - 1)
    log = MetricsLogger(
        cfg.logging.out_dir,
        enabled=s.layout.rank == 0,
        total_steps=cfg.steps,
        config=to_dict(cfg),
        wandb_project=cfg.logging.wandb_project,
        progress_bar=cfg.logging.progress_bar,
        start_step=first,
        step_lines=True,
    )
    timer = PhaseTimer()
    results: dict[str, Any] = {"eval_before": s.evaluate(step=0)} if first == 1 else {"resumed_at_step": first - 1}
    # Partial rollouts: a group that completed in the same segment as a full batch waits one request
    # on the rollout ranks, so it may be one version older than the others (module doc).
    queue = StalenessQueue(S + int(cfg.rollout.partial), capacity=(S + 1 + int(cfg.rollout.partial)) * P)
    requests = Requests(s, sampler, queue, first, cfg.steps - first + 1)
    with timer("rollout"):  # the prefill: S batches at the starting weights
        for _ in range(S):
            requests.submit()
            requests.collect()
    watchdog = StepWatchdog(
        cfg.parallel.step_timeout_s, phase=lambda: timer.current, rank=s.layout.rank, first_step=first, echo=console()
    ).start()
    set_collective_timeout(watchdog.backstop_s)  # start-up is over: no collective may wait longer

    def score(texts: list[str], golds: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        r_acc, _, metrics = score_distributed(
            texts, golds, timeout_s=cfg.data.reward_timeout_s, budget_s=cfg.data.reward_step_budget_s
        )
        return r_acc, metrics

    for step in range(first, cfg.steps + 1):
        if len(queue) < P:  # (S = 0, or groups dropped): sample this step's batch now, not overlapped
            with timer("rollout"):
                requests.submit()
                requests.collect()
        groups, async_m = queue.pop(P, version=step - 1)
        requests.submit()  # the rollout ranks generate a later step's batch while this one trains
        examples = [g.example for g in groups]
        batch = rollout_rounds.collect(
            cfg, _Sampled(groups), examples.copy, s.train_sampling(step), score, dp=s.layout.dp, timer=timer
        )
        seqs = batch.sequences(trained_truncated=not cfg.algo.overlong.filter)
        global_tokens = seqs.num_response_tokens()
        minis = batching.split_mini_batches(
            seqs,
            seqs_per_update=cfg.batch.update_prompts * G,
            dp=s.layout.dp,
            dp_rank=s.layout.dp_rank,
            pad_id=s.pad_id,
            micro_batch_size=cfg.batch.micro_batch_size,
            max_tokens=cfg.batch.max_tokens_per_micro_batch,
            uniform_length=s.layout.pp > 1,
            pad_to_multiple=actor.pad_multiple,
            packing=cfg.batch.packing,
        )
        ppo_kw = {"mode": cfg.rollout.logprob_mode, "epochs": cfg.algo.ppo_epochs}
        with timer("logprobs"):  # the proximal policy: the weights before this update
            ppo.attach_logprobs(actor, reference, minis, temperature=T, **ppo_kw)
        with timer("update"):
            train_m = ppo.update(actor, minis, loss_cfg, temperature=T, kl_coef=kl_coef, eps=eps, **ppo_kw)
        with timer("rollout_wait"):  # what the generation took beyond the training it overlapped
            requests.collect()
        async_m.update(requests.pool_metrics)
        with timer("weight_sync"):
            colo.to_rollout(version=step)
        row = step_row(
            **batch.seen,
            times=timer.pop(),
            trained_tokens=cfg.algo.ppo_epochs * global_tokens,
            kl_coef=kl_coef,
            eps=eps,
            **batch.metrics,
            train=train_m,
            task=s.task_metrics(batch.completions(), (batch.r_acc.flatten() > 0.5).tolist()),
            **{"async": async_m},
        ) | batching.padding_summary(minis)
        # Generation overlapped the update: no phase of this step measures it on its own.
        row.pop("throughput/rollout_tokens_per_s", None)
        if cfg.eval_due(step):
            timer.mark("evaluate")
            row.update({f"eval/{k}": v for k, v in s.evaluate(step=step).items()})
        log.log(step, row)
        kl_coef = kl_ctl.update(train_m.get("kl_ref", 0.0))
        eps = clip_ctl.update(train_m.get("approx_kl_off_policy", 0.0))
        watchdog.beat()
        stop = preempt.requested()
        timer.mark(f"checkpoint save of step {step}")
        saved = ckpt.maybe_save(step, kl_coef, eps, force=stop)  # nothing in flight here: queued groups are lost
        if stop:
            log.close()
            raise preempt.Preempted(step, str(saved) if saved else None)

    watchdog.stop()
    set_collective_timeout(cfg.parallel.timeout_s)
    results["eval_after"] = s.evaluate(step=cfg.steps)
    colo.finish()
    log.close()
    return results
