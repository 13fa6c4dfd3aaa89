"""rollout.placement / num_ranks / max_staleness / partial: validated up front, one line naming the field."""

import pytest

from agpo_megatron.config.yaml_io import ConfigError
from agpo_megatron.models.tiny import tiny_hf_config
from agpo_megatron.plan.load import load_train_config


@pytest.fixture(scope="module")
def yaml_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny_hf_config("qwen2", num_heads=4, num_kv_heads=2, num_layers=2).save_pretrained(d)
    p = d / "cfg.yaml"
    p.write_text(
        f"model: {{hf_path: {d}}}\n"
        "data: {train: {path: x.jsonl, answer_format: gsm8k}}\n"
        "algo: {gamma: 0.1, group_size: 4}\n"
        "batch: {prompts_per_rollout: 8, micro_batch_size: 4}\n"
    )
    return p


def test_defaults_are_colocated_and_synchronous(yaml_file):
    r = load_train_config(yaml_file, []).rollout
    assert (r.placement, r.num_ranks, r.max_staleness, r.partial) == ("colocated", 0, 0, False)
    assert r.trainer_ranks(4) == 4


def test_partial_rollouts_are_accepted_off_policy(yaml_file):
    split = ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=1"]
    r = load_train_config(yaml_file, [*split, "rollout.partial=true", "rollout.segment_tokens=8"]).rollout
    assert (r.partial, r.segment_tokens) == (True, 8)


def test_disaggregated_splits_the_world(yaml_file):
    cfg = load_train_config(
        yaml_file, ["rollout.placement=disaggregated", "rollout.num_ranks=2", "rollout.max_staleness=2"]
    )
    assert cfg.rollout.trainer_ranks(6) == 4
    assert cfg.check_world(6) == 4  # dp over the 4 trainer ranks, not the 6 of the world
    assert cfg.check_world(3) == 1
    with pytest.raises(ConfigError, match=r"rollout.num_ranks \(2\) must be below the world size 2"):
        cfg.check_world(2)
    tp2 = load_train_config(yaml_file, ["rollout.placement=disaggregated", "rollout.num_ranks=1", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"trainer ranks 3 \(world 4 - rollout.num_ranks\) is not a multiple of tp"):
        tp2.check_world(4)
    # colocated: rollout.tp must divide the world; disaggregated: it must divide num_ranks instead
    assert load_train_config(yaml_file, ["rollout.tp=2"]).check_world(4) == 4
    with pytest.raises(ConfigError, match="not a multiple of rollout.tp"):
        load_train_config(yaml_file, ["rollout.tp=2"]).check_world(3)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["rollout.placement=split"], "rollout.placement: 'split' is not one of"),
        (["rollout.num_ranks=1"], "rollout.num_ranks=1 needs rollout.placement=disaggregated"),
        (["rollout.max_staleness=1"], "rollout.max_staleness=1 needs rollout.placement=disaggregated"),
        (["rollout.partial=true"], "rollout.partial needs rollout.placement=disaggregated"),
        (["rollout.placement=disaggregated"], "rollout.num_ranks (0) must be >= 1"),
        (["rollout.placement=disaggregated", "rollout.tp=2", "rollout.num_ranks=3"], "multiple of rollout.tp (2)"),
        (
            ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=-1"],
            "rollout.max_staleness must be an integer >= 0",
        ),
        (
            ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.partial=true"],
            "rollout.partial needs rollout.max_staleness >= 1",
        ),
        (
            [
                "rollout.placement=disaggregated",
                "rollout.num_ranks=1",
                "rollout.max_staleness=1",
                "rollout.partial=true",
                "rollout.segment_tokens=0",
            ],
            "rollout.segment_tokens must be an integer >= 1",
        ),
        (
            [
                "rollout.placement=disaggregated",
                "rollout.num_ranks=1",
                "rollout.max_staleness=1",
                "algo.advantage=grpo",
                "algo.dynamic_sampling.enabled=true",
            ],
            "rollout.max_staleness=1 with algo.dynamic_sampling.enabled",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(yaml_file, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_train_config(yaml_file, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)
