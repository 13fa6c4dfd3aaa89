"""Resume checks (issue 20): one line for a changed seed or data, extending a finished run, and the LR
schedule an extension continues on (train/resume_checks.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from agpo_megatron.config.schema import OptimConfig, TrainConfig
from agpo_megatron.config.yaml_io import ConfigError, load_config, to_dict
from agpo_megatron.train.resume_checks import check_compatible, horizon_matters, lr_at

LAYOUT = SimpleNamespace(tp=1, pp=1, ep=1, etp=1)


def _cfg(*o: str) -> TrainConfig:
    base = ["data.train.path=x.jsonl", "data.train.answer_format=boxed", "batch.prompts_per_rollout=8"]
    base.append("data.train.metadata_fields=[level]")  # a tuple in the config, a list in the saved JSON
    return load_config(TrainConfig, None, [*base, "batch.micro_batch_size=1", *o])


def _check(saved: TrainConfig, now: TrainConfig, step: int = 2):
    # The config as run_state.json holds it: JSON, so tuples (data.train.metadata_fields) come back as lists.
    stored = json.loads(json.dumps(to_dict(saved), default=str))
    return check_compatible({"layout": {"tp": 1, "pp": 1}, "config": stored, "step": step}, now, LAYOUT, "ck")


@pytest.mark.parametrize(
    "override, saved, now",
    [
        ("parallel.seed=2", "parallel.seed=1234", "parallel.seed=2"),
        ("data.train.path=y.jsonl", "data.train.path='x.jsonl'", "data.train.path='y.jsonl'"),
        ("batch.prompts_per_rollout=16", "batch.prompts_per_rollout=8", "batch.prompts_per_rollout=16"),
    ],
)
def test_a_changed_data_order_is_one_line_naming_field_and_values(override, saved, now):
    with pytest.raises(ConfigError) as e:
        _check(_cfg(), _cfg(override, "batch.prompts_per_update=8"))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"was saved with {saved}, this run has {now}" in msg
    assert f"resume with {saved}" in msg and "start fresh (checkpoint.resume=never" in msg


def test_extending_a_constant_lr_run_needs_no_flag():
    override, note = _check(_cfg("steps=2"), _cfg("steps=4"))
    assert override and note == "extending the run from steps=2 to steps=4 (the LR schedule is unchanged)"
    assert _check(_cfg("steps=4"), _cfg("steps=4")) == (False, None)
    # A warm-up is not the horizon's either: it ends at the same optimizer step.
    assert _check(_cfg("steps=2", "optim.warmup_steps=3"), _cfg("steps=9", "optim.warmup_steps=3"))[0]


def test_extending_a_decaying_lr_needs_the_override_and_says_how_the_lr_moves():
    saved = _cfg("steps=2", "optim.decay_style=cosine", "optim.lr=1e-3")
    with pytest.raises(ConfigError) as e:
        _check(saved, _cfg("steps=4", "optim.decay_style=cosine", "optim.lr=1e-3"))
    assert "set optim.override_schedule=true" in str(e.value) and "optim.decay_style=cosine" in str(e.value)
    override, note = _check(
        saved, _cfg("steps=4", "optim.decay_style=cosine", "optim.lr=1e-3", "optim.override_schedule=true")
    )
    # 1 update per step: the old schedule ended at 2 (LR 0 there), the new one is halfway at 2:
    # 1e-3 * (cos(pi/2) + 1) / 2 = 5e-4.
    assert override
    assert note == (
        "optim.override_schedule: the LR schedule now ends at optimizer step 4 (was 2); at the saved step 2 "
        "the LR moves from 0 to 0.0005, and decays to 0 at step 4"
    )


def test_other_schedule_changes_stay_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"different LR schedule \(optim.lr, optim.warmup_steps\)"):
        _check(_cfg(), _cfg("optim.lr=1e-5", "optim.warmup_steps=2", "optim.override_schedule=true"))
    with pytest.raises(ConfigError, match="steps=1 is below the saved step 2"):
        _check(_cfg("steps=4"), _cfg("steps=1"))


def test_lr_at_is_megatrons_schedule():
    """Hand-worked values, and Megatron's OptimizerParamScheduler at every step of two schedules."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cos = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_style="cosine")
    assert lr_at(cos, 10, 1) == pytest.approx(5e-4)  # warm-up from 0: half-way
    assert lr_at(cos, 10, 6) == pytest.approx(1e-4 + 0.9e-3 * (math.cos(math.pi * 0.5) + 1) / 2)  # 5.5e-4
    assert lr_at(cos, 10, 10) == pytest.approx(1e-4) and lr_at(cos, 10, 11) == pytest.approx(1e-4)
    lin = OptimConfig(lr=1e-3, decay_style="linear")
    assert lr_at(lin, 4, 1) == pytest.approx(7.5e-4)
    assert horizon_matters(cos) and horizon_matters(lin)
    assert not horizon_matters(OptimConfig(lr=1e-3, warmup_steps=5))
    assert not horizon_matters(OptimConfig(lr=1e-3, min_lr=1e-3, decay_style="cosine"))
    for optim, total in ((cos, 10), (lin, 4)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
        sched = OptimizerParamScheduler(
            opt,
            init_lr=0.0 if optim.warmup_steps else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(total, optim.warmup_steps + 1),
            lr_decay_style=optim.decay_style,
            start_wd=0.0,
            end_wd=0.0,
            wd_incr_steps=total,
            wd_incr_style="constant",
        )
        for n in range(1, total + 1):
            sched.step(increment=1)
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(optim, total, n), rel=1e-12), n


def test_a_changed_expert_layout_is_refused_in_one_line():
    """Issue 23: the sidecar records EP/ETP; resuming an MoE run at another EP is refused, naming both
    layouts. A checkpoint from before EP was recorded counts as ep = etp = 1."""
    cfg = _cfg()
    stored = json.loads(json.dumps(to_dict(cfg), default=str))

    def check(saved_layout, now):
        return check_compatible({"layout": saved_layout, "config": stored, "step": 2}, cfg, now, "ck")

    with pytest.raises(ConfigError) as e:
        check({"tp": 1, "pp": 1, "ep": 2, "etp": 1}, SimpleNamespace(tp=1, pp=1, ep=1, etp=1))
    assert str(e.value).startswith("checkpoint.resume: ck was saved at tp=1 pp=1 ep=2; this run has tp=1 pp=1 ep=1.")
    assert "resume at the saved tp/pp/ep" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="saved at tp=1 pp=1 ep=1 etp=1; this run has tp=1 pp=1 ep=2 etp=2"):
        check({"tp": 1, "pp": 1}, SimpleNamespace(tp=1, pp=1, ep=2, etp=2))  # saved before EP was recorded
    assert check({"tp": 1, "pp": 1}, SimpleNamespace(tp=1, pp=1, ep=1, etp=1)) == (False, None)
    assert check({"tp": 1, "pp": 1, "ep": 2, "etp": 1}, SimpleNamespace(tp=1, pp=1, ep=2, etp=1)) == (False, None)
