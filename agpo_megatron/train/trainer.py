"""The AGPO / GRPO training loop.

    generate -> sleep -> reward (+ length reward, overlong punishment) -> advantage -> old/ref log-probs
    -> update -> wake weights -> weight sync -> wake KV cache -> log -> (checkpoint, vLLM asleep)

(one step's rollout batch, with DAPO's dynamic sampling rounds when on: train/rollout_rounds.py)

(the memory hand-overs between vLLM and Megatron, and their order, live in train/colocate.py)

Every rank runs this same function (SPMD) inside one torchrun/srun world: vLLM and Megatron are
colocated. The rollout gathers the whole global batch onto every rank; each rank checks a share of
the answers and an all-gather gives all the same rewards (data/reward_dist.py), so advantages and
the global token count are then computed redundantly and identically everywhere, without collectives;
each PPO mini-batch is then dealt to the Megatron data-parallel ranks (`batch.balance_dp`: equal
counts, balanced tokens) and packed into micro-batches (`batch.packing`).

Departures from the AGPO paper (arXiv 2503.15952):
- The paper does not say how uniform groups whose reward is strictly between r_min and r_max are
  treated (possible with shaped rewards); they get advantage 0 here (algo/advantages.py).
- The loss defaults to token-mean over the global mini-batch (`algo.loss.agg_mode`); the paper follows
  GRPO's per-sequence mean. Both are available.
- A rollout of batch.prompts_per_rollout prompts makes prompts_per_rollout / prompts_per_update
  optimizer steps per PPO epoch (train/ppo.py); the paper's mini-batch of 32 prompts is prompts_per_update,
  its rollout batch is not stated (the 7B-72B presets sample 128: 4 updates per rollout).
"""

from __future__ import annotations

from typing import Any

import torch

from agpo_megatron.algo.controllers import clip_controller, kl_controller
from agpo_megatron.bridge.export import sync_weights
from agpo_megatron.config.yaml_io import to_dict
from agpo_megatron.data.datasets import PromptSampler
from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.report.console import console
from agpo_megatron.report.metrics import MetricsLogger, PhaseTimer, step_row
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


def train(session: Session, actor: Actor | None = None) -> dict[str, Any]:
    """Run `session.cfg` (build the session with `Session.create(cfg)`, or `session.for_run(cfg)` to
    reuse one). `actor`: start from these weights instead of `cfg.model` (the demo's warm start)."""
    preempt.install()  # SIGTERM/SIGUSR1: save at the next step boundary, exit 75
    s, cfg = session, session.cfg
    warm_start = actor is not None  # initial weights from memory: the run saves a copy for the Reference
    actor = actor or Actor(s.arch, cfg, s.layout, total_steps=cfg.optimizer_steps())
    loss_cfg = cfg.algo.loss
    needs_ref = loss_cfg.kl_coef > 0 or cfg.algo.adaptive_kl_target is not None
    # Fixed or adaptive (A-GRPO): the loop treats both alike.
    kl_ctl = kl_controller(cfg.algo.kl_settings(), loss_cfg.kl_coef)
    clip_ctl = clip_controller(cfg.algo.clip_settings(), (loss_cfg.eps_low, loss_cfg.eps_high))
    sampler = PromptSampler(s.train_examples, batch_size=cfg.batch.prompts_per_rollout, seed=cfg.parallel.seed)
    colo = Colocation(
        s.rollout,
        ActorMemory(actor.chunks, actor.optimizer, cfg.offload),
        sync=lambda: sync_weights(actor.chunks, s.arch, s.rollout, version=colo.version),
    )
    ckpt = RunCheckpointer(cfg, s.layout, actor, sampler, kl_ctl, clip_ctl, resident=colo.actor_resident)
    # The reference is the policy RL starts from, rebuilt from its recorded source on resume.
    reference = ckpt.reference(s.arch, warm_start=warm_start) if needs_ref else None
    # Step 1 runs at the controllers' starting values; on resume, at the values the saved step chose.
    first, kl_coef, eps = ckpt.resume()
    colo.start(version=first - 1)  # vLLM serves exactly the actor's weights from the start
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
    timer, G, T = PhaseTimer(), cfg.algo.group_size, cfg.rollout.temperature
    results: dict[str, Any] = {"eval_before": s.evaluate(step=0)} if first == 1 else {"resumed_at_step": first - 1}
    watchdog = StepWatchdog(
        cfg.parallel.step_timeout_s, phase=lambda: timer.current, rank=s.layout.rank, first_step=first, echo=console()
    ).start()
    set_collective_timeout(watchdog.backstop_s)  # start-up is over: no collective may wait longer

    def score(texts: list[str], golds: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        # Each rank checks its share; all get the same verdicts (one reward, one advantage per sample).
        r_acc, _, metrics = score_distributed(
            texts, golds, timeout_s=cfg.data.reward_timeout_s, budget_s=cfg.data.reward_step_budget_s
        )
        return r_acc, metrics

    for step in range(first, cfg.steps + 1):
        # generate -> reward (+ length reward, overlong punishment) -> advantage; DAPO: more rounds.
        batch = rollout_rounds.collect(
            cfg,
            s.rollout,
            lambda: next(sampler),
            s.train_sampling(step),
            score,
            dp=s.layout.dp,
            timer=timer,
            release=colo.to_train,  # GPU: vLLM's memory to training, the actor's state back
        )
        seqs = batch.sequences(trained_truncated=not cfg.algo.overlong.filter)
        global_tokens = seqs.num_response_tokens()
        plan_kw = dict(
            micro_batch_size=cfg.batch.micro_batch_size,
            max_tokens=cfg.batch.max_tokens_per_micro_batch,
            uniform_length=s.layout.pp > 1,
            pad_to_multiple=actor.pad_multiple,
            packing=cfg.batch.packing,
        )
        minis = batching.split_mini_batches(
            seqs,
            seqs_per_update=cfg.batch.update_prompts * G,
            dp=s.layout.dp,
            dp_rank=s.layout.dp_rank,
            pad_id=s.pad_id,
            same_shape_across_dp=s.layout.ep > 1,  # MoE: the EP ranks exchange tokens per forward
            **plan_kw,
        )
        ppo_kw = {"mode": cfg.rollout.logprob_mode, "epochs": cfg.algo.ppo_epochs}

        with timer("logprobs"):  # once per rollout, before the first update
            ppo.attach_logprobs(actor, reference, minis, temperature=T, **ppo_kw)

        with timer("update"):
            train_m = ppo.update(actor, minis, loss_cfg, temperature=T, kl_coef=kl_coef, eps=eps, **ppo_kw)

        with timer("weight_sync"):
            colo.to_rollout(version=step)  # every completion sampled from now on carries `step`

        row = step_row(
            **batch.seen,  # every sampled response, kept or not
            times=timer.pop(),
            trained_tokens=cfg.algo.ppo_epochs * global_tokens,
            kl_coef=kl_coef,
            eps=eps,
            **batch.metrics,
            train=train_m,
            task=s.task_metrics(batch.completions(), (batch.r_acc.flatten() > 0.5).tolist()),  # the demo's steps task
        ) | batching.padding_summary(minis)
        if cfg.eval_due(step):
            timer.mark("evaluate")
            row.update({f"eval/{k}": v for k, v in s.evaluate(step=step).items()})
        log.log(step, row)  # the beta and eps this step used; the controllers now choose the next step's
        kl_coef = kl_ctl.update(train_m.get("kl_ref", 0.0))
        eps = clip_ctl.update(train_m.get("approx_kl_off_policy", 0.0))  # adaptive: config ensures 2+ updates
        watchdog.beat()
        stop = preempt.requested()  # collective: every rank stops after the same step
        timer.mark(f"checkpoint save of step {step}")  # what a hang here is named by the watchdog
        # After the step's row is logged, so a crash after the commit never loses it. The save's
        # residency puts vLLM to sleep first and reloads the actor without its grads (issue 18;
        # train/colocate.py `actor_resident`), then hands the weights back to vLLM.
        saved = ckpt.maybe_save(step, kl_coef, eps, force=stop)
        if stop:
            log.close()
            raise preempt.Preempted(step, str(saved) if saved else None)

    watchdog.stop()
    set_collective_timeout(cfg.parallel.timeout_s)  # the final evaluation may be long
    results["eval_after"] = s.evaluate(step=cfg.steps)
    colo.finish()
    log.close()
    return results
