"""The rollout-batch component (train/rollout_rounds.py) with a scripted engine: no model, no vLLM."""

import torch
from torch.testing import assert_close

from agpo_megatron.config.algo import AlgoConfig, DynamicSamplingConfig, OverlongConfig
from agpo_megatron.config.model import ModelConfig
from agpo_megatron.config.schema import BatchConfig, DataConfig, RolloutConfig, TrainConfig
from agpo_megatron.data.datasets import DatasetConfig, Example
from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.train.batch import split_mini_batches
from agpo_megatron.train.rollout_rounds import collect

# A prompt's first token says how its group turns out: 0 all wrong, 1 all correct, 2 mixed (1 of 2).
WRONG, RIGHT, MIXED = 0, 1, 2


class ScriptedEngine:
    def __init__(self, events):
        self.events, self.seeds = events, []

    def generate(self, prompts, n, sampling):
        self.events.append("generate")
        self.seeds.append(sampling.seed)
        out = []
        for p, ids in enumerate(prompts):
            verdicts = {WRONG: [0] * n, RIGHT: [1] * n, MIXED: [1] + [0] * (n - 1)}[ids[0]]
            # Response i has i + 2 tokens; the last one of each group stops at the budget.
            out.append(
                [
                    Completion(
                        prompt_index=p,
                        token_ids=[7] * (i + 2),
                        logprobs=None,
                        text="right" if v else "wrong",
                        finish_reason="length" if i == n - 1 else "stop",
                    )
                    for i, v in enumerate(verdicts)
                ]
            )
        return out


def _cfg(**algo) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(train=DatasetConfig(path="x.jsonl", answer_format="raw", max_prompt_tokens=8)),
        algo=AlgoConfig(**{"group_size": 2, "length_reward": False, "advantage": "grpo", **algo}),
        batch=BatchConfig(prompts_per_rollout=4, micro_batch_size=2),
        rollout=RolloutConfig(max_new_tokens=8),
        model=ModelConfig(max_seq_len=64),
    )


def _run(cfg, rounds_of_kinds, dp=1):
    events = []
    engine = ScriptedEngine(events)
    batches = iter(
        [
            [Example(prompt_ids=[k, 5], prompt_text="", gold="right", index=10 * r + i) for i, k in enumerate(kinds)]
            for r, kinds in enumerate(rounds_of_kinds)
        ]
    )

    def score(texts, golds):
        events.append("score")
        return torch.tensor([float(t == g) for t, g in zip(texts, golds)]), {"frac_correct": 0.0, "num_timeouts": 1.0}

    batch = collect(
        cfg,
        engine,
        lambda: next(batches),
        SamplingConfig(seed=100),
        score,
        dp=dp,
        timer=lambda name: __import__("contextlib").nullcontext(),
        release=lambda: events.append("release"),
    )
    return batch, events, engine.seeds


def test_without_dynamic_sampling_one_round_keeps_every_group_and_releases_before_scoring():
    batch, events, _ = _run(_cfg(), [[WRONG, RIGHT, MIXED, MIXED]])
    assert events == ["generate", "release", "score"]  # as before issue 22: vLLM sleeps, then the reward
    assert [ex.index for ex in batch.prompts] == [0, 1, 2, 3]
    assert batch.metrics["sampling"] == {
        "rounds": 1.0,
        "prompts_sampled": 4.0,
        "groups_kept": 4.0,
        "frac_kept": 1.0,
        "short_batch": 0.0,
    }
    assert_close(batch.advantages[:2], torch.zeros(2, 2))  # GRPO: uniform groups get 0


def test_dynamic_sampling_collects_mixed_groups_over_rounds_by_hand():
    cfg = _cfg(dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rollout_rounds=3))
    # Round 1: two mixed groups (indices 2, 3); round 2: three more (10, 12, 13); 4 are enough.
    batch, events, seeds = _run(cfg, [[WRONG, RIGHT, MIXED, MIXED], [MIXED, WRONG, MIXED, MIXED], [MIXED] * 4])
    assert events == ["generate", "score", "generate", "score", "release"]  # awake between rounds
    assert seeds[0] == 100 and seeds[1] != seeds[0]  # each round samples with its own seed
    assert [ex.index for ex in batch.prompts] == [2, 3, 10, 12]  # whole groups, in sampling order
    assert batch.metrics["sampling"] == {
        "rounds": 2.0,
        "prompts_sampled": 8.0,
        "groups_kept": 4.0,
        "frac_kept": 0.5,
        "short_batch": 0.0,
    }
    # Kept groups are [right, wrong]: GRPO gives +-1/sqrt(2) (unbiased std of [1, 0]).
    assert_close(batch.advantages, torch.tensor([[2**-0.5, -(2**-0.5)]] * 4), atol=1e-5, rtol=0)
    # The row describes everything sampled (8 groups), the fractions averaged and the counts summed over rounds.
    assert batch.seen["r_acc"].shape == (8, 2) and len(batch.seen["finish_reasons"]) == 16
    assert batch.metrics["reward"] == {"frac_correct": 0.0, "num_timeouts": 2.0}


def test_a_short_batch_trains_whole_units_and_says_so():
    cfg = _cfg(dynamic_sampling=DynamicSamplingConfig(enabled=True, max_rollout_rounds=2))
    # 3 mixed groups in 2 rounds; with dp 2 (unit: 2 groups) the step trains 2 of them.
    batch, events, _ = _run(cfg, [[WRONG, MIXED, RIGHT, MIXED], [WRONG, WRONG, MIXED, RIGHT]], dp=2)
    assert events == ["generate", "score", "generate", "release", "score"]  # round 2 is known to be the last
    assert [ex.index for ex in batch.prompts] == [1, 3]
    assert batch.metrics["sampling"]["short_batch"] == 1.0 and batch.metrics["sampling"]["groups_kept"] == 2.0
    seqs = batch.sequences()
    minis = split_mini_batches(
        seqs, seqs_per_update=8, dp=2, dp_rank=0, pad_id=0, micro_batch_size=2, max_tokens=None, uniform_length=False
    )
    assert len(minis) == 1 and minis[0].num_seqs == 4  # one shorter mini-batch, the global count of what trains
    # Nothing mixed at all: no group, no update.
    empty, _, _ = _run(cfg, [[WRONG] * 4, [RIGHT] * 4], dp=2)
    assert empty.prompts == [] and empty.advantages.shape == (0, 2)
    assert empty.metrics["sampling"]["frac_kept"] == 0.0 and empty.sequences().tokens == []


def test_overlong_filter_masks_truncated_responses_out_of_the_loss_and_its_count():
    cfg = _cfg(overlong=OverlongConfig(filter=True))
    batch, _, _ = _run(cfg, [[MIXED, MIXED, MIXED, MIXED]])
    seqs = batch.sequences(trained_truncated=False)
    assert seqs.trained == [True, False] * 4  # the second response of each group hit max_new_tokens
    # Responses have 2 and 3 tokens: only the 2-token ones count.
    assert seqs.num_response_tokens() == 4 * 2 and batch.sequences().num_response_tokens() == 4 * 5
    minis = split_mini_batches(
        seqs, seqs_per_update=8, dp=1, dp_rank=0, pad_id=0, micro_batch_size=2, max_tokens=None, uniform_length=False
    )
    mb = minis[0].micro_batches[0]
    assert mb["loss_mask"][0].sum() == 2 and mb["loss_mask"][1].sum() == 0
    assert (minis[0].num_tokens, minis[0].num_seqs) == (8, 4)
    # Packed rows mask the same tokens.
    packed = split_mini_batches(
        seqs,
        seqs_per_update=8,
        dp=1,
        dp_rank=0,
        pad_id=0,
        micro_batch_size=2,
        max_tokens=None,
        uniform_length=False,
        packing=True,
    )
    assert sum(float(m["loss_mask"].sum()) for m in packed[0].micro_batches) == 8


def test_soft_punishment_is_added_after_the_length_reward():
    cfg = _cfg(length_reward=True, overlong=OverlongConfig(soft_punishment=True, buffer_tokens=6, penalty=1.0))
    batch, _, _ = _run(cfg, [[MIXED, RIGHT, WRONG, WRONG]])
    # Lengths 2 and 3 of 8, ramp from 8 - 6 = 2: 0 and -1/6. Mixed group: the correct answer (length 2)
    # gets r_len 1 (gamma 0.1), the wrong one (length 3) the punishment; all-correct: 1 - 0 and 1 - 1/6.
    assert_close(batch.rewards, torch.tensor([[1.1, -1 / 6], [1.0, 1 - 1 / 6], [0.0, -1 / 6], [0.0, -1 / 6]]))
    assert batch.metrics["overlong"]["frac_overlong_punished"] == 0.5
