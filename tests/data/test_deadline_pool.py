"""Tests for the generic deadline process pool: per-task deadlines, the per-call budget, recovery."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agpo_megatron.data.deadline_pool import DeadlinePool, Outcome, Status
from tests.data.pool_fns import SLOW_IMPORT_S, misbehaving, pair
from tests.dist import pid_alive

ROOT = Path(__file__).resolve().parents[2]
DONE_TRUE, DONE_FALSE = Outcome(Status.DONE, True), Outcome(Status.DONE, False)


@pytest.fixture()
def hang_pool():
    with DeadlinePool(2, fn=misbehaving) as p:
        p.start()  # both workers idle and ready: which task runs where is then deterministic
        assert p.run([("a", "a"), ("a", "b")], timeout_s=60) == [DONE_TRUE, DONE_FALSE]
        yield p


def test_returns_whatever_fn_returns_in_task_order():
    with DeadlinePool(2, fn=pair) as p:
        out = p.run([(1, 2), (3, 4), (5, 6)], timeout_s=60)
        assert out == [Outcome(Status.DONE, v) for v in [(3, 2), (7, 12), (11, 30)]]
        assert p.run([], timeout_s=60) == []


def test_hanging_crashing_and_raising_tasks_and_the_pool_recovers(hang_pool):
    out = hang_pool.run([("y", "y"), ("x", "hang"), ("z", "w")], timeout_s=0.5)
    assert out == [DONE_TRUE, Outcome(Status.TIMEOUT), DONE_FALSE]  # the replacement serves the rest
    assert hang_pool.num_timeouts == 1 and hang_pool.num_restarts == 1

    # A worker that dies mid-task is replaced without counting as a timeout.
    assert hang_pool.run([("x", "die")], timeout_s=60) == [Outcome(Status.WORKER_DIED)]
    assert hang_pool.num_timeouts == 1 and hang_pool.num_restarts == 2

    # A raising fn fails its task only; the worker is kept.
    [failed] = hang_pool.run([("x", "raise")], timeout_s=60)
    assert failed.status is Status.FAILED and "cannot check this" in failed.value
    assert hang_pool.num_restarts == 2
    assert hang_pool.run([("x", "x")], timeout_s=60) == [DONE_TRUE]


@pytest.mark.slow
def test_budget_bounds_a_call_of_hostile_tasks(hang_pool):
    """N hanging tasks on 2 workers: without a budget each one waits out its own deadline (N
    timeouts, N worker restarts, N / 2 rounds); with a budget of one deadline only the two running
    ones are cut off and the rest never start."""
    n = 8
    out = hang_pool.run([("x", "hang")] * n, timeout_s=1.0, budget_s=1.0)
    assert all(o.missed_deadline for o in out)
    assert sum(o.status is Status.TIMEOUT for o in out) == 2  # the two that were running
    assert sum(o.status is Status.OVER_BUDGET for o in out) == n - 2
    assert hang_pool.num_restarts == 2 and hang_pool.num_timeouts == n

    out = hang_pool.run([("x", "hang")] * 4, timeout_s=0.5)  # no budget: every task is tried
    assert [o.status for o in out] == [Status.TIMEOUT] * 4
    assert hang_pool.num_restarts == 2 + 4


def test_budget_keeps_finished_results_and_skips_the_queue(hang_pool):
    out = hang_pool.run([("a", "a"), ("x", "hang"), ("x", "hang"), ("b", "b")], timeout_s=30, budget_s=1.0)
    assert out[0] == DONE_TRUE
    assert [o.status for o in out[1:3]] == [Status.TIMEOUT, Status.TIMEOUT]
    assert out[3] == Outcome(Status.OVER_BUDGET)  # queued behind two hanging tasks past the budget


@pytest.mark.slow
def test_budget_starts_with_the_first_task_not_with_pool_start_up(monkeypatch):
    # Each worker's start-up (the preload) takes longer than the budget; the tasks still run.
    monkeypatch.setenv("AGPO_TEST_SLOW_IMPORT", "1")
    with DeadlinePool(2, fn=misbehaving, preload=("tests.data.pool_fns",)) as p:
        assert p.run([("a", "a")] * 4, timeout_s=60, budget_s=SLOW_IMPORT_S / 2) == [DONE_TRUE] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"timeout_s": 0}, "timeout_s must be > 0"), ({"timeout_s": 1, "budget_s": 0}, "budget_s must be > 0")],
)
def test_bad_arguments(kwargs, match):
    with DeadlinePool(1, fn=pair) as p, pytest.raises(ValueError, match=match):
        p.run([(1, 2)], **kwargs)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        DeadlinePool(0, fn=pair)


def test_closed_pool_refuses_work():
    p = DeadlinePool(1, fn=pair)
    p.close()
    assert not p.usable
    with pytest.raises(RuntimeError, match="closed"):
        p.run([(1, 2)], timeout_s=1)


_ORPHAN_PARENT = """
import threading, time
from agpo_megatron.data.deadline_pool import DeadlinePool
from tests.data.pool_fns import misbehaving
if __name__ == "__main__":
    pool = DeadlinePool(2, fn=misbehaving)
    threading.Thread(target=pool.run, args=([("1", "hang"), ("2", "hang")],), kwargs=dict(timeout_s=600),
                     daemon=True).start()
    while len(pool._workers) < 2:
        time.sleep(0.05)
    time.sleep(2.0)  # both workers are now inside their (endless) task
    print(*[w.process.pid for w in pool._workers], flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    """Issue 11: after `kill -9` of the parent, its pool workers (busy in a task) go away."""
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive before the parent dies
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if pid_alive(p)]
        assert not alive, f"pool workers {alive} outlived their parent"
    finally:
        parent.kill()
