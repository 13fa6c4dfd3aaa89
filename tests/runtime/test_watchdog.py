"""Hung ranks fail fast (issue 11): a stopped peer makes the others exit, naming the phase."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agpo_megatron.runtime.watchdog import EXIT_HUNG, StepWatchdog
from tests.dist import pid_alive, torchrun_cmd

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_exit_within_the_step_timeout():
    step_timeout = 5.0
    cmd = torchrun_cmd(2, str(ROOT / "tests" / "workers" / "hung_peer.py"), str(step_timeout))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    pids = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (len(pids) == 2 and any(l.startswith("STEP 1 50") for l in lines)):
            pids = {int(l.split()[1]): int(l.split()[2]) for l in list(lines) if l.startswith("PID")}
            time.sleep(0.2)
        assert len(pids) == 2, "".join(lines)[-3000:]
        os.kill(pids[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The healthy rank must exit by itself; torchrun then waits up to 30 s for the stopped one.
        while pid_alive(pids[0]) and time.monotonic() - stopped_at < step_timeout + 30:
            time.sleep(0.2)
        took = time.monotonic() - stopped_at
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        for pid in pids.values():  # a stopped process only dies to SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    out = "".join(lines)
    assert rc != 0, out[-3000:]
    assert "rank 0: no training step finished" in out and "stuck in 'update' at step " in out, out[-3000:]
    assert f"Exiting with code {EXIT_HUNG}" in out
    assert took < step_timeout + 30, took


def test_watchdog_is_off_at_zero_and_quiet_while_beating():
    from agpo_megatron.runtime.watchdog import StepWatchdog

    off = StepWatchdog(0).start()
    assert not off._thread.is_alive()
    wd = StepWatchdog(0.5, poll_s=0.05).start()
    for _ in range(20):  # 1 s of beats every 0.05 s: never idle for 0.5 s
        time.sleep(0.05)
        wd.beat()
    wd.stop()
    wd._thread.join(1)
    assert not wd._thread.is_alive()  # ended by stop(); had it fired, os._exit would have killed pytest


@pytest.mark.slow
def test_collectives_during_steps_time_out_at_the_tighter_bound(tmp_path):
    """parallel.timeout_s covers start-up; set_collective_timeout bounds each collective of the steps."""
    from tests.dist import torchrun

    try:
        out = torchrun("collective_timeout.py", timeout=120)
    except AssertionError as e:  # a rank may exit non-zero after a broken collective; the line is what counts
        out = str(e)
    line = next(l for l in out.splitlines() if l.startswith(("TIMEOUT", "NOTIMEOUT")))
    assert line.startswith("TIMEOUT"), out[-3000:]
    took, groups = float(line.split()[1]), int(line.split()[2])
    assert took < 7.0 and groups >= 2, line  # the peer was 8 s late; the bound is 2 s


@pytest.mark.parametrize("timeout_s", [0.5, 20.0, 1800.0])
def test_the_collective_backstop_waits_past_the_watchdogs_latest_firing(timeout_s):
    # The watchdog fires at most one poll after timeout_s; a collective begun right at a beat must
    # not time out before that, or the rank exits 1 with a gloo error instead of 124 (seen in CI).
    wd = StepWatchdog(timeout_s)
    assert wd.backstop_s >= timeout_s + wd.poll_s + 5.0
    assert StepWatchdog(0).backstop_s == 0.0  # off stays off
