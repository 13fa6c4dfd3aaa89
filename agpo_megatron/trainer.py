"""The AGPO / GRPO training loop.

    generate -> sleep -> reward (+ length reward) -> advantage -> old/ref log-probs -> update
    -> wake weights -> weight sync -> wake KV cache -> log

(the memory hand-overs between vLLM and Megatron, and their order, live in colocate.py)

Every rank runs this same function (SPMD) inside one torchrun/srun world: vLLM and Megatron are
colocated. The rollout gathers the whole global batch onto every rank, so rewards, advantages and
the global token count are computed redundantly and identically everywhere, without collectives;
each Megatron data-parallel rank then trains on its share of the sequences (`batch.balance_dp`:
equal counts, balanced tokens), packed into micro-batches (`batch.packing`).

Departures from the AGPO paper (arXiv 2503.15952):
- The paper does not say how uniform groups whose reward is strictly between r_min and r_max are
  treated (possible with shaped rewards); they get advantage 0 here (algo/advantages.py).
- The loss defaults to token-mean over the global batch (`algo.loss.agg_mode`); the paper follows
  GRPO's per-sequence mean. Both are available.
- One optimizer step per rollout batch per PPO epoch (the paper's mini-batch 32 = prompts_per_step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from agpo_megatron import batch as batching
from agpo_megatron import preempt
from agpo_megatron.algo.advantages import compute_advantages
from agpo_megatron.algo.controllers import AdaptiveClipController, AdaptiveKLController
from agpo_megatron.algo.rewards import combine_rewards, length_reward
from agpo_megatron.bridge.export import sync_weights
from agpo_megatron.colocate import Colocation
from agpo_megatron.config import TrainConfig
from agpo_megatron.config_io import to_dict
from agpo_megatron.data.datasets import PromptSampler
from agpo_megatron.data.math_reward import score_batch
from agpo_megatron.metrics import MetricsLogger, PhaseTimer
from agpo_megatron.parallel import set_collective_timeout
from agpo_megatron.offload import ActorMemory
from agpo_megatron.policy import Actor
from agpo_megatron.run_checkpoint import RunCheckpointer
from agpo_megatron.session import Session
from agpo_megatron.watchdog import StepWatchdog


def train(cfg: TrainConfig, session: Session | None = None, actor: Actor | None = None) -> dict[str, Any]:
    preempt.install()  # SIGTERM/SIGUSR1: save at the next step boundary, exit 75
    s = session or Session.create(cfg)
    warm_start = actor is not None  # initial weights from memory: the run saves a copy for the Reference
    actor = actor or Actor(s.arch, cfg, s.layout, total_steps=cfg.steps * cfg.algo.ppo_epochs)
    loss_cfg = cfg.algo.loss
    needs_ref = loss_cfg.kl_coef > 0 or cfg.algo.adaptive_kl_target is not None
    kl_set, clip_set = cfg.algo.kl_settings(), cfg.algo.clip_settings()  # None: fixed beta / eps
    kl_ctl = AdaptiveKLController(kl_set) if kl_set else None
    clip_ctl = AdaptiveClipController(clip_set) if clip_set else None
    sampler = PromptSampler(s.train_examples, batch_size=cfg.batch.prompts_per_step, seed=cfg.parallel.seed)
    colo = Colocation(s.rollout, ActorMemory(actor.chunks, actor.optimizer, cfg.offload),
                      sync=lambda: sync_weights(actor.chunks, s.arch, s.rollout))
    ckpt = RunCheckpointer(cfg, s.layout, actor, sampler, kl_ctl, clip_ctl, resident=colo.actor_resident)
    # The reference is the policy RL starts from, rebuilt from its recorded source on resume.
    reference = ckpt.reference(s.arch, warm_start=warm_start) if needs_ref else None
    # Step 1 runs at the controllers' starting values; on resume, at the values the saved step chose.
    first, kl_coef, eps = ckpt.resume(kl_ctl.beta if kl_ctl else loss_cfg.kl_coef,
                                      (clip_ctl.eps_low, clip_ctl.eps_high) if clip_ctl else (loss_cfg.eps_low, loss_cfg.eps_high))
    colo.start()  # vLLM serves exactly the actor's weights from the start
    log = MetricsLogger(cfg.logging.out_dir, enabled=s.layout.rank == 0, total_steps=cfg.steps, config=to_dict(cfg),
                        wandb_project=cfg.logging.wandb_project, progress_bar=cfg.logging.progress_bar)
    timer, G, T = PhaseTimer(), cfg.algo.group_size, cfg.rollout.temperature
    results: dict[str, Any] = {"eval_before": s.evaluate(step=0)} if first == 1 else {"resumed_at_step": first - 1}
    watchdog = StepWatchdog(cfg.parallel.step_timeout_s, phase=lambda: timer.current, rank=s.layout.rank).start()
    set_collective_timeout(cfg.parallel.step_timeout_s)  # start-up is over: no collective may wait longer

    for step in range(first, cfg.steps + 1):
        prompts = next(sampler)
        with timer("rollout"):
            groups = s.rollout.generate([ex.prompt_ids for ex in prompts], n=G, sampling=s.train_sampling(step))
            colo.to_train()  # GPU: vLLM's memory to training, the actor's state back
        completions = [c for group in groups for c in group]  # [P*G], prompt-major

        with timer("reward"):
            golds = [ex.gold for ex in prompts for _ in range(G)]
            r_acc, _, reward_m = score_batch([c.text for c in completions], golds, timeout_s=cfg.data.reward_timeout_s)
            r_acc = r_acc.view(-1, G)  # [P, G]
            lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float).view(-1, G)
            rewards, len_m = r_acc, {}
            if cfg.algo.length_reward:  # AGPO m2: length reward first, the advantage sees the sum
                r_len, len_m = length_reward(r_acc > 0.5, lengths)
                rewards = combine_rewards(r_acc, r_len, cfg.algo.gamma)
            adv_kw = dict(r_min=cfg.algo.r_min, r_max=cfg.algo.r_max) if cfg.algo.advantage == "agpo" else {}
            advantages, adv_m = compute_advantages(rewards, cfg.algo.advantage, **adv_kw)  # [P, G]

        seqs = batching.Sequences(
            tokens=[ex.prompt_ids + c.token_ids for ex, group in zip(prompts, groups) for c in group],
            prompt_lens=[len(ex.prompt_ids) for ex in prompts for _ in range(G)],
            advantages=advantages.flatten(),
            rollout_logprobs=[c.logprobs for c in completions] if completions[0].logprobs is not None else None,
        )
        global_tokens, global_seqs = seqs.num_response_tokens(), len(seqs)
        seq_lens = [len(t) for t in seqs.tokens]  # prompt + response
        dp_seqs = batching.balance_dp(seq_lens, s.layout.dp)  # equal counts, balanced tokens
        mine = seqs.select(dp_seqs[s.layout.dp_rank])
        plan_kw = dict(micro_batch_size=cfg.batch.micro_batch_size, max_tokens=cfg.batch.max_tokens_per_micro_batch,
                       uniform_length=s.layout.pp > 1, pad_to_multiple=actor.pad_multiple, packing=cfg.batch.packing)
        mbs = batching.split_micro_batches(mine, pad_id=s.pad_id, **plan_kw)

        with timer("logprobs"):
            if cfg.rollout.logprob_mode == "recompute":
                for mb, out in zip(mbs, actor.logprobs(mbs, temperature=T)):
                    mb["old_logprobs"] = out["logprobs"]
            else:
                for mb in mbs:
                    mb["old_logprobs"] = mb["rollout_logprobs"]
            if reference is not None:
                for mb, out in zip(mbs, reference.logprobs(mbs, temperature=T)):
                    mb["ref_logprobs"] = out["logprobs"]

        with timer("update"):
            for _ in range(cfg.algo.ppo_epochs):
                train_m = actor.policy_step(mbs, loss_cfg, temperature=T, global_num_tokens=global_tokens,
                                            global_num_seqs=global_seqs, kl_coef=kl_coef, eps=eps)

        with timer("weight_sync"):
            colo.to_rollout()

        times = timer.pop()
        correct = r_acc.flatten() > 0.5
        row = {
            "reward/mean": rewards.mean().item(), "acc/mean": r_acc.mean().item(),
            "len/mean": lengths.mean().item(), "len/max": lengths.max().item(),
            "len/correct_mean": lengths.flatten()[correct].mean().item() if correct.any() else math.nan,
            "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
            **{f"adv/{k}": float(v) for k, v in adv_m.items()}, **{f"len_reward/{k}": float(v) for k, v in len_m.items()},
            **{f"reward/{k}": float(v) for k, v in reward_m.items()}, **{f"train/{k}": v for k, v in train_m.items()},
            **batching.padding_stats(seq_lens, dp_seqs, **plan_kw),
            "train/kl_coef": kl_coef, "train/eps_low": eps[0], "train/eps_high": eps[1], **times,
            "throughput/rollout_tokens_per_s": lengths.sum().item() / max(times["time/rollout"], 1e-9),
            "throughput/train_tokens_per_s": cfg.algo.ppo_epochs * global_tokens / max(times["time/update"], 1e-9),
        }
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.steps:
            row.update({f"eval/{k}": v for k, v in s.evaluate(step=step).items()})
        log.log(step, row)  # the beta and eps this step used; the controllers now choose the next step's
        kl_coef = kl_ctl.update(train_m.get("kl_ref", 0.0)) if kl_ctl else kl_coef
        eps = clip_ctl.update(train_m.get("approx_kl", 0.0)) if clip_ctl else eps
        watchdog.beat()
        stop = preempt.requested()  # collective: every rank stops after the same step
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

