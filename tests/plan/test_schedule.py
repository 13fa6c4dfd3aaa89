"""The placement / staleness schedule model (plan/schedule.py), on hand-worked numbers."""

import pytest

from agpo_megatron.plan.schedule import (
    PhaseTimes,
    colocated_step,
    disaggregated_step,
    sides_step,
    sides_step_samples,
    speedups,
)

# 8 devices: generation 60 s, reward 2 s, training 30 s, sync 4 s, hand-overs 4 s -> 100 s colocated.
T = PhaseTimes(devices=8, generate=60, reward=2, train=30, sync=4, handover=4, tail=0.25)


def test_colocated_is_the_sum_of_its_phases():
    assert colocated_step(T) == 100


def test_a_4_plus_4_split():
    # gen(4) = 60 x (0.75 x 8/4 + 0.25) = 60 x 1.75 = 105; train(4) = 30 x 8/4 = 60.
    assert disaggregated_step(T, rollout_devices=4, staleness=0) == 105 + 2 + 60 + 4
    # Overlapped: max(105, 2 + 60) + 4 = 109.
    assert disaggregated_step(T, rollout_devices=4, staleness=1) == 109
    assert disaggregated_step(T, rollout_devices=4, staleness=2) == 109  # one request in flight either way
    assert disaggregated_step(T, rollout_devices=4, staleness=1, sync=1) == 106
    s = speedups(T, rollout_devices=4)
    assert s == {0: pytest.approx(100 / 171), 1: pytest.approx(100 / 109), 2: pytest.approx(100 / 109)}


def test_a_split_matched_to_the_phases_gains():
    # 5 rollout + 3 trainer devices: gen = 60 x (0.75 x 8/5 + 0.25) = 87, train = 30 x 8/3 = 80.
    assert disaggregated_step(T, rollout_devices=5, staleness=1) == pytest.approx(87 + 4)
    assert speedups(T, rollout_devices=5, stalenesses=(1,))[1] == pytest.approx(100 / 91)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="rollout_devices"):
        disaggregated_step(T, rollout_devices=8, staleness=0)
    with pytest.raises(ValueError, match="tail"):
        PhaseTimes(devices=8, generate=1, reward=0, train=1, sync=0, tail=2)
    with pytest.raises(ValueError, match="staleness"):
        disaggregated_step(T, rollout_devices=4, staleness=-1)


def test_when_training_is_the_longer_side_it_sets_the_pace():
    # 6 rollout + 2 trainer devices: gen = 60 x (0.75 x 8/6 + 0.25) = 75, reward + train = 2 + 30 x 8/2 = 122.
    assert disaggregated_step(T, rollout_devices=6, staleness=1) == pytest.approx(122 + 4)
    assert disaggregated_step(T, rollout_devices=6, staleness=0) == pytest.approx(75 + 122 + 4)


def test_the_schedule_from_each_sides_own_times():
    # Measured sides: generation 0.4 s, reward 0.01 s, log-probs + update 0.3 s, sync 0.05 s.
    sides = dict(generate=0.4, reward=0.01, train=0.3, sync=0.05)
    assert sides_step(**sides, staleness=0) == pytest.approx(0.4 + 0.01 + 0.3 + 0.05)
    assert sides_step(**sides, staleness=1) == pytest.approx(0.4 + 0.05)  # generation is the longer side
    assert sides_step(**{**sides, "train": 0.5}, staleness=2) == pytest.approx(0.51 + 0.05)
    with pytest.raises(ValueError, match="staleness"):
        sides_step(**sides, staleness=-1)


def test_varying_phases_make_the_overlapped_step_slower_than_fixed_ones():
    # Generation 0.3 or 0.5 s, training 0.2 or 0.6 s (medians 0.4 and 0.4), sync 0.1.
    # Pairs: max(0.3, 0.2), max(0.3, 0.6), max(0.5, 0.2), max(0.5, 0.6) = 0.3, 0.6, 0.5, 0.6 -> +0.1:
    # 0.4, 0.7, 0.6, 0.7; median (0.6 + 0.7) / 2 = 0.65, above fixed medians' max(0.4, 0.4) + 0.1 = 0.5.
    gen, train = [0.3, 0.5], [0.2, 0.6]
    assert sides_step_samples(generate=gen, train=train, sync=0.1, staleness=1) == pytest.approx(0.65)
    assert sides_step(generate=0.4, reward=0.0, train=0.4, sync=0.1, staleness=1) == pytest.approx(0.5)
    # Staleness 0 adds them: 0.5, 0.9, 0.7, 1.1 -> +0.1: 0.6, 1.0, 0.8, 1.2; median (0.8 + 1.0) / 2 = 0.9.
    assert sides_step_samples(generate=gen, train=train, sync=0.1, staleness=0) == pytest.approx(0.9)
    assert sides_step_samples(generate=[0.3], train=[0.2, 0.6, 0.4], sync=0.0, staleness=2) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least one"):
        sides_step_samples(generate=[], train=[0.1], sync=0.0, staleness=1)
