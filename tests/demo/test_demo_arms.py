"""`agpo demo --arms` names the same methods as the sweep (config/arms.py), and every arm's overrides
validate on the demo's own config, so `agpo demo --arms grpo,agpo,dapo` cannot fail at the third arm."""

from pathlib import Path

import pytest

from agpo_megatron.config import arms as arm_table
from agpo_megatron.demo.run import ARMS, parse_arms
from agpo_megatron.plan.load import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_demo_arms_are_the_sweep_arms():
    assert set(ARMS) == set(arm_table.ARMS)
    assert parse_arms("grpo,agpo,dapo") == ["grpo", "agpo", "dapo"]
    assert ARMS["dapo"] == ("DAPO", arm_table.arm_overrides("dapo"))
    with pytest.raises(ValueError, match="--arms"):
        parse_arms("grpo,ppo")


@pytest.mark.parametrize("arm", list(arm_table.ARMS))
def test_every_arm_validates_on_the_demo_config(arm, tmp_path, monkeypatch):
    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_train_config(ROOT / "examples" / "demo_cpu.yaml", ["model.hf_path=tiny:qwen2", *ARMS[arm][1]])
    expected = {"grpo": "grpo", "agpo": "agpo", "agpo-m1": "agpo", "dapo": "grpo", "gspo": "grpo"}
    assert cfg.algo.advantage == expected.get(arm, cfg.algo.advantage)
    assert cfg.algo.dynamic_sampling.enabled == (arm == "dapo")
