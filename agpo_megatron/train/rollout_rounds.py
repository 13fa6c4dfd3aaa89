"""One step's rollout batch: generate, score, shape the rewards, (DAPO) keep the mixed groups, advantages.

    round 1..R:  prompts -> generate (n = G) -> accuracy rewards -> keep mixed groups (dynamic sampling)
    then:        length reward (m2) + overlong punishment -> advantages of the kept groups

Without `algo.dynamic_sampling` there is exactly one round and every group is kept: the step is
GRPO / AGPO's. With it, rounds continue (each one another `batch.prompts_per_rollout` prompts from
the sampler, with its own sampling seed) until `batch.prompts_per_rollout` mixed groups are found or
`max_rollout_rounds` is reached; groups are kept or dropped whole (algo/sampling.py).

Where the memory changes hands: `release` (the colocation's hand-over from vLLM to training) runs
once, right after the last generate when that round is known to be the last, else after the scoring
that filled the batch, so vLLM stays awake between rounds.

Metrics (`sampling/`): `rounds`, `prompts_sampled`, `groups_kept`, `frac_kept` (kept over sampled
groups) and `short_batch` (1 when the batch has fewer than `batch.prompts_per_rollout` groups: the step
trains on what it found, cut to whole mini-batches over the DP ranks, possibly nothing). The step's
`reward/`, `acc/`, `len/` and `truncated_frac` rows describe every sampled response, kept or not:
what the policy does on random prompts, comparable across arms (the kept ones are biased to
accuracy 1/2 by construction).

Departures from DAPO: its rounds sample a separate `gen_batch_size` of prompts; here each round
samples `batch.prompts_per_rollout`. A short batch makes fewer optimizer steps than the schedule
counts (verl does the same), so the LR schedule runs a little behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from agpo_megatron.algo.advantages import compute_advantages
from agpo_megatron.algo.rewards import combine_rewards, length_reward, overlong_penalty
from agpo_megatron.algo.sampling import group_unit, mixed_groups, trainable_groups
from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.data.datasets import Example
from agpo_megatron.rollout.base import Completion, RolloutEngine, SamplingConfig
from agpo_megatron.train.sequences import Sequences

ScoreFn = Callable[[list[str], list[str]], tuple[torch.Tensor, dict[str, float]]]
"""(responses, golds) -> (accuracy rewards [N] float32, metrics): `score_distributed` in the trainer."""

_ROUND_SEED_STRIDE = 1_000_003
"""Added to the step's sampling seed per extra round, so a round's samples differ from the last's."""


@dataclasses.dataclass
class RolloutBatch:
    """What one step trains on (the kept groups) and what it saw (every sampled response)."""

    prompts: list[Example]
    """Kept prompts, P of them (0 <= P <= batch.prompts_per_rollout)."""
    groups: list[list[Completion]]
    """G completions per kept prompt."""
    r_acc: torch.Tensor  # [P, G]
    """Accuracy rewards of the kept groups."""
    rewards: torch.Tensor  # [P, G]
    """Shaped rewards of the kept groups (accuracy + gamma * length reward + overlong punishment)."""
    advantages: torch.Tensor  # [P, G]
    """Advantages of the kept groups."""
    metrics: dict[str, dict[str, Any]]
    """Metric groups for `step_row`: adv, len_reward, overlong, reward, sampling."""
    seen: dict[str, Any]
    """`step_row`'s r_acc, rewards, lengths ([S, G]) and finish_reasons ([S*G]) of all S sampled groups."""

    def completions(self) -> list[Completion]:
        """The kept completions, flat and prompt-major (`[P*G]`, the order of `r_acc.flatten()`)."""
        return [c for group in self.groups for c in group]

    def sequences(self, trained_truncated: bool = True) -> Sequences:
        """The kept completions as a flat, prompt-major batch. `trained_truncated=False`
        (algo.overlong.filter) keeps responses that hit max_new_tokens out of the loss."""
        flat = [c for group in self.groups for c in group]
        return Sequences(
            tokens=[ex.prompt_ids + c.token_ids for ex, group in zip(self.prompts, self.groups) for c in group],
            prompt_lens=[len(ex.prompt_ids) for ex, group in zip(self.prompts, self.groups) for _ in group],
            advantages=self.advantages.flatten(),
            rollout_logprobs=[c.logprobs for c in flat] if flat and flat[0].logprobs is not None else None,
            trained=None if trained_truncated else [c.finish_reason != "length" for c in flat],
            routed_experts=[c.routed_experts for c in flat] if flat and flat[0].routed_experts is not None else None,
        )


def shape_rewards(
    r_acc: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:  # [P, G] -> [P, G]
    """r = r_acc (+ gamma * r_len, AGPO m2) (+ r_over, DAPO's soft punishment), in that order (algo/rewards.py)."""
    a, metrics = cfg.algo, {}
    rewards = r_acc
    if a.length_reward:  # the length reward first, on accuracy and lengths alone
        r_len, metrics["len_reward"] = length_reward(r_acc > 0.5, lengths)
        rewards = combine_rewards(r_acc, r_len, a.gamma)
    if a.overlong.soft_punishment:
        r_over, metrics["overlong"] = overlong_penalty(
            lengths,
            max_new_tokens=cfg.rollout.max_new_tokens,
            buffer_tokens=a.overlong.buffer_tokens or cfg.rollout.max_new_tokens // 5,  # filled in by the config
            penalty=a.overlong.penalty,
        )
        rewards = rewards + r_over
    return rewards, metrics


def collect(
    cfg: TrainConfig,
    engine: RolloutEngine,
    next_prompts: Callable[[], list[Example]],
    sampling: SamplingConfig,
    score: ScoreFn,
    *,
    dp: int,
    timer: Callable[[str], Any],
    release: Callable[[], None] = lambda: None,
) -> RolloutBatch:
    """Run the rounds of one step (module doc) and return its batch.

    `next_prompts()` draws the next batch.prompts_per_rollout prompts; `sampling` is the step's (each
    extra round shifts its seed); `score` gives the accuracy rewards; `dp` sizes a short batch;
    `timer(phase)` is a context manager charging time to "rollout" / "reward"; `release()` is called
    once, after the last generate.
    """
    G, target, ds = cfg.algo.group_size, cfg.batch.prompts_per_rollout, cfg.algo.dynamic_sampling
    rounds = ds.max_rollout_rounds if ds.enabled else 1
    prompts: list[Example] = []
    groups: list[list[Completion]] = []
    accs: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    reward_ms: list[dict[str, float]] = []
    released = False
    for k in range(rounds):
        batch = next_prompts()
        # Round 1 samples exactly as a step without dynamic sampling does.
        round_sampling = (
            sampling if k == 0 else dataclasses.replace(sampling, seed=sampling.seed + k * _ROUND_SEED_STRIDE)
        )
        with timer("rollout"):
            out = engine.generate([ex.prompt_ids for ex in batch], n=G, sampling=round_sampling)
            if k == rounds - 1:
                release()
                released = True
        with timer("reward"):
            texts = [c.text for group in out for c in group]
            golds = [ex.gold for ex in batch for _ in range(G)]
            r_acc, m = score(texts, golds)
            r_acc = r_acc.view(-1, G)  # [P_k, G]
            reward_ms.append(m)
        prompts += batch
        groups += out
        accs.append(r_acc)
        kept.append(mixed_groups(r_acc) if ds.enabled else torch.ones(len(batch), dtype=torch.bool))
        if int(torch.cat(kept).sum()) >= target:
            break
    if not released:
        with timer("rollout"):
            release()

    r_acc_all = torch.cat(accs)  # [S, G]
    keep_all = torch.cat(kept)  # [S]
    lengths_all = torch.tensor([[len(c.token_ids) for c in g] for g in groups], dtype=torch.float)  # [S, G]
    rewards_all, shaped_m = shape_rewards(r_acc_all, lengths_all, cfg)
    # The batch: the first n mixed groups, n cut to what splits into whole mini-batches.
    unit = group_unit(dp=dp, group_size=G, micro_batch_size=cfg.batch.micro_batch_size)
    n = trainable_groups(int(keep_all.sum()), target, unit)
    idx = keep_all.nonzero().flatten()[:n].tolist()
    if idx:
        adv_kw = dict(r_min=cfg.algo.r_min, r_max=cfg.algo.r_max) if cfg.algo.advantage == "agpo" else {}
        advantages, adv_m = compute_advantages(rewards_all[idx], cfg.algo.advantage, **adv_kw)
    else:
        advantages, adv_m = torch.zeros(0, G), {}
    sampled = len(prompts)
    metrics: dict[str, dict[str, Any]] = {
        "adv": adv_m,
        **shaped_m,
        "reward": _merge_rounds(reward_ms),
        "sampling": {
            "rounds": float(len(accs)),
            "prompts_sampled": float(sampled),
            "groups_kept": float(n),
            "frac_kept": n / sampled,
            "short_batch": float(n < target),
        },
    }
    return RolloutBatch(
        prompts=[prompts[i] for i in idx],
        groups=[groups[i] for i in idx],
        r_acc=r_acc_all[idx],
        rewards=rewards_all[idx],
        advantages=advantages,
        metrics=metrics,
        seen={
            "r_acc": r_acc_all,
            "rewards": rewards_all,
            "lengths": lengths_all,
            "finish_reasons": [c.finish_reason for g in groups for c in g],
        },
    )


def _merge_rounds(per_round: list[dict[str, float]]) -> dict[str, float]:
    """The rounds' reward metrics as one: fractions (`frac_*`) averaged (every round scores the same
    number of responses), counts summed."""
    keys = sorted({k for m in per_round for k in m})
    return {
        k: sum(float(m.get(k, 0.0)) for m in per_round) / (len(per_round) if k.startswith("frac_") else 1) for k in keys
    }
