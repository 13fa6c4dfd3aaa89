"""metrics.jsonl rows, the plot command, and bad-input errors that name file and line."""

import json

import pytest

from agpo_megatron.cli import main
from agpo_megatron.report.jsonl import read_jsonl
from agpo_megatron.report.metrics import MetricsLogger, PhaseTimer


def test_jsonl_and_plot(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, total_steps=3, config={"a": 1}, progress_bar=False)
    timer = PhaseTimer()
    for step in range(1, 4):
        with timer("rollout"):
            pass
        log.log(step, {"reward/mean": 0.1 * step, "len/mean": 50 - step, **timer.pop()})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["len/mean"] == 47
    assert "time/rollout" in rows[0]
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "metrics.jsonl"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run(out, start_step, steps):
    log = MetricsLogger(out, enabled=True, total_steps=len(steps), progress_bar=False, start_step=start_step)
    for step in steps:
        log.log(step, {"run": start_step})
    log.close()


def test_a_fresh_run_moves_an_earlier_runs_rows_aside(tmp_path):
    _run(tmp_path, 1, [1, 2, 3])
    _run(tmp_path, 1, [1, 2])
    assert [(r["step"], r["run"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 1)]
    (aside,) = tmp_path.glob("metrics.*.jsonl")  # the earlier run's rows, intact
    assert [r["step"] for r in read_jsonl(aside)] == [1, 2, 3]
    _run(tmp_path, 1, [1])  # a third run in the same second gets its own name
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 2


def test_a_resumed_run_keeps_the_steps_before_it_and_logs_the_rest_once(tmp_path):
    _run(tmp_path, 1, [1, 2, 3, 4])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "ru')  # killed mid-write
    _run(tmp_path, 3, [3, 4, 5])  # the checkpoint was at step 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["run"]) for r in rows] == [(1, 1), (2, 1), (3, 3), (4, 3), (5, 3)]
    assert not list(tmp_path.glob("metrics.*.jsonl"))


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl(p)


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(
        tmp_path,
        enabled=True,
        total_steps=2,
        config={"algo": {"gamma": 0.1}},
        wandb_project="agpo-test",
        progress_bar=False,
    )
    log.log(1, {"reward/mean": 0.5})
    log.log(2, {"reward/mean": 0.75})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_phase_timer_synchronizes_cuda_at_both_ends_and_reports_peak_memory(monkeypatch):
    """Issue 8: without a sync, a phase is charged for kernels its predecessor queued."""
    import torch

    from agpo_megatron.report.metrics import PhaseTimer

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    timer = PhaseTimer(cuda=True)
    with timer("update"):
        events.append("work")
    assert events == ["sync", "reset", "work", "sync"]
    out = timer.pop()
    assert out["mem/update_peak_gib"] == 3.0 and out["time/update"] >= 0
    assert "mem/update_peak_gib" not in PhaseTimer(cuda=False).pop()
