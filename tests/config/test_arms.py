"""config/arms.py: every arm is a valid config of every base the comparisons use, and is its method."""

from pathlib import Path

import pytest

from agpo_megatron.config.arms import ARMS, arm_overrides, parse_arms
from agpo_megatron.models.tiny import tiny_hf_config
from agpo_megatron.plan.load import load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASES = ["agpo_qwen7b.yaml", "tiny_cpu.yaml", "demo_cpu.yaml"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny_hf_config("qwen2", num_heads=4, num_kv_heads=2, num_layers=2).save_pretrained(d)
    return d


@pytest.mark.parametrize("base", BASES)
def test_every_arm_is_a_valid_config_that_changes_only_algo(base, hf_dir):
    over = [f"model.hf_path={hf_dir}", "parallel.tp=1", "parallel.pp=1", "rollout.tp=1"]
    plain = load_train_config(EXAMPLES / base, over)
    for name in ARMS:
        cfg = load_train_config(EXAMPLES / base, [*over, *arm_overrides(name)])
        cfg.check_world(2)
        # Same model, data, rollout and batch: arms can share a warm start and one engine (Session.for_run).
        for section in ("model", "parallel", "rollout", "data", "batch"):
            assert getattr(cfg, section) == getattr(plain, section), (name, section)
        a = cfg.algo
        method = {
            "grpo": a.advantage == "grpo" and not a.length_reward,
            "agpo-m1": a.advantage == "agpo" and not a.length_reward,
            "agpo": a.advantage == "agpo" and a.length_reward,
            "dapo": a.dynamic_sampling.enabled and a.overlong.soft_punishment and a.loss.eps_high == 0.28,
            "gspo": a.loss.ratio_level == "sequence" and a.loss.agg_mode == "seq-mean-token-mean",
            "rloo": a.advantage == "rloo",
            "drgrpo": a.advantage == "drgrpo" and a.loss.norm_tokens == cfg.rollout.max_new_tokens,
        }[name]
        assert method, name
        assert name in ("dapo",) or not a.dynamic_sampling.enabled


def test_parse_arms_checks_names_and_keeps_order():
    assert parse_arms("grpo, agpo,dapo,grpo") == ["grpo", "agpo", "dapo"]
    with pytest.raises(ValueError, match="unknown arm 'ppo'; known arms: grpo, agpo-m1"):
        parse_arms("grpo,ppo")
    with pytest.raises(ValueError, match="no arm"):
        parse_arms(" , ")
    arm_overrides("dapo").append("x")  # a copy: the table itself is unchanged
    assert "x" not in ARMS["dapo"]
