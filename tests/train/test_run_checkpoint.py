"""run_checkpoint's single-process parts: choosing what to resume from, metrics trim, the resume checks."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from agpo_megatron.checkpoint import step_dirs
from agpo_megatron.config.schema import CheckpointConfig
from agpo_megatron.config.yaml_io import ConfigError
from agpo_megatron.train.run_checkpoint import _trim_metrics, find_resume


def _step(save_dir: Path, step: int, complete: bool = True) -> Path:
    d = save_dir / step_dirs.step_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / step_dirs.COMPLETE_MARKER).write_text("{}")
    return d


def _cfg(**kw):
    return SimpleNamespace(checkpoint=CheckpointConfig(**kw))


def test_find_resume(tmp_path):
    save = tmp_path / "ckpt"
    assert find_resume(_cfg(save_dir=str(save))) is None  # auto, nothing there yet
    _step(save, 1)
    _step(save, 2)
    _step(save, 3, complete=False)
    assert find_resume(_cfg(save_dir=str(save))) == save / "step_000002"
    assert find_resume(_cfg(save_dir=str(save), resume="never")) is None
    assert find_resume(_cfg(resume=str(save / "step_000001"))) == save / "step_000001"
    assert find_resume(_cfg(resume=str(save))) == save / "step_000002"  # a save_dir: its newest
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        find_resume(_cfg(resume=str(save / "step_000003")))
    assert find_resume(_cfg()) is None  # auto without save_dir


def test_trim_metrics_drops_rows_after_the_checkpoint(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "x"')
    _trim_metrics(f, 2)
    assert [json.loads(line)["step"] for line in f.read_text().splitlines()] == [1, 2]
    _trim_metrics(tmp_path / "absent.jsonl", 2)  # a fresh out_dir: nothing to do


def test_resume_refuses_another_number_of_updates_per_rollout():
    """Issue 10: the LR schedule counts optimizer steps, so updates per rollout is part of it; a config
    saved before the rename (batch.prompts_per_step) reads as one update per rollout."""
    from agpo_megatron.config.schema import TrainConfig
    from agpo_megatron.config.yaml_io import load_config, to_dict
    from agpo_megatron.train.run_checkpoint import check_compatible

    def cfg(*o):
        return load_config(
            TrainConfig,
            None,
            [
                "data.train.path=x.jsonl",
                "data.train.answer_format=boxed",
                "batch.prompts_per_rollout=8",
                "batch.micro_batch_size=1",
                *o,
            ],
        )

    def check(saved, now):
        check_compatible(
            {"layout": {"tp": 1, "pp": 1}, "config": saved}, now, SimpleNamespace(tp=1, pp=1, ep=1, etp=1), "ckpt"
        )

    old = to_dict(cfg())
    old["batch"] = {"prompts_per_step": 8, "micro_batch_size": 1, "max_tokens_per_micro_batch": None}
    check(old, cfg())
    check(to_dict(cfg("batch.prompts_per_update=2")), cfg("batch.prompts_per_update=2", "batch.micro_batch_size=2"))
    with pytest.raises(
        ConfigError, match=r"different LR schedule \(batch.prompts_per_rollout / batch.prompts_per_update\)"
    ):
        check(old, cfg("batch.prompts_per_update=4"))


def test_a_step_folder_another_run_committed_is_one_line_naming_both_runs(tmp_path):
    """Issue 20, where the run lock cannot work (no flock): the step folder this run is about to
    commit appeared meanwhile, written by another run."""
    from agpo_megatron.train.run_checkpoint import RunCheckpointer

    other = _step(tmp_path, 3)
    (other / step_dirs.COMPLETE_MARKER).write_text(json.dumps({"run_id": "feedbeef0001", "step": 3}))
    me = SimpleNamespace(save_dir=tmp_path, run_id="0123456789ab")
    msg = RunCheckpointer._foreign(me, other)
    assert "\n" not in msg
    assert msg.startswith(f"{other} was written by another run (run id feedbeef0001; this run is 0123456789ab)")
    assert f"two runs share checkpoint.save_dir={tmp_path}" in msg
