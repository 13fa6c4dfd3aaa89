"""Secrets (env vars named *KEY, *TOKEN, *SECRET, WANDB_API_KEY) never reach logs or saved configs."""

import json
import logging

from agpo_megatron.report.metrics import MetricsLogger
from agpo_megatron.report.redact import MASK, redact, secret_values

SECRET = "hf_Sup3rS3cretValue"


def test_secret_values_by_env_name(monkeypatch):
    env = {
        "HF_TOKEN": SECRET,
        "WANDB_API_KEY": "w" * 40,
        "MY_SECRET": "abcdefgh",
        "PATH": "/usr/bin:/bin",
        "SHORT_KEY": "abc",
        "MONKEY": "not-a-secret?",
    }
    vals = secret_values(env)
    assert set(vals) == {SECRET, "w" * 40, "abcdefgh", "not-a-secret?"}  # MONKEY ends in KEY: masked too
    assert redact({"a": [f"x{SECRET}y", ("abcdefgh",)], SECRET: 1}, vals) == {"a": [f"x{MASK}y", (MASK,)], MASK: 1}


def test_config_metrics_and_log_records_are_redacted(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    log = MetricsLogger(
        tmp_path,
        enabled=True,
        total_steps=1,
        progress_bar=False,
        config={"model": {"hf_path": f"https://user:{SECRET}@host/model"}},
    )
    log.log(1, {"note": f"token={SECRET}", "x": 1.0})
    log.close()
    written = (tmp_path / "config.json").read_text() + (tmp_path / "metrics.jsonl").read_text()
    assert SECRET not in written and MASK in written
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["x"] == 1.0
    with caplog.at_level(logging.INFO):
        logging.getLogger("vllm.some.module").warning("loading with token %s", SECRET)
    assert SECRET not in caplog.text and MASK in caplog.text


def test_checkpoint_run_state_config_is_redacted(monkeypatch, tmp_path):
    """The config saved in every checkpoint (run_checkpoint.RunCheckpointer) carries no secret."""
    import types

    from agpo_megatron.algo.controllers import FixedClipController, FixedKLController
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.runtime.parallel import Layout
    from agpo_megatron.train.run_checkpoint import RunCheckpointer

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = load_train_config(
        None, ["data.train.path=x.jsonl", "data.train.answer_format=raw", f"logging.wandb_project=team-{SECRET}"]
    )
    fake = types.SimpleNamespace(
        cfg=cfg,
        sampler=types.SimpleNamespace(state_dict=lambda: {}),
        kl_ctl=FixedKLController(0.0),
        clip_ctl=FixedClipController(0.2, 0.2),
        reference_source=None,
        run_id="0123456789ab",
        layout=Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0),
    )
    state = RunCheckpointer._run_state(fake, 3, 0.0, (0.2, 0.2))
    assert SECRET not in json.dumps(state) and state["config"]["logging"]["wandb_project"] == f"team-{MASK}"
