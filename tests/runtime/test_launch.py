"""The `agpo train --nproc-per-node` supervisor (runtime/launch.py) on small stand-in ranks: one exit
code, error lines once, signals forwarded, a hung rank killed as soon as a peer's watchdog fired.
The same supervisor around real `agpo train` ranks: tests/train/test_launch_e2e.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agpo_megatron.runtime.launch import Supervisor, exit_code

ROOT = Path(__file__).resolve().parents[2]


def test_exit_code_of_the_run():
    from agpo_megatron.runtime import launch, preempt

    assert launch.EXIT_PREEMPTED == preempt.EXIT_PREEMPTED
    assert exit_code([0, 0]) == 0
    assert exit_code([75, 75]) == 75
    assert exit_code([124, None]) == 124  # the other rank was killed by the supervisor
    assert exit_code([2, None]) == 2
    assert exit_code([2, 124]) == 124  # a hang outranks a user error
    assert exit_code([75, 0]) == 1  # one rank saved and stopped, the other finished: not a clean preemption
    assert exit_code([0, None]) == 1
    assert exit_code([-9, -9]) == 1  # killed by the kernel (OOM)
    assert exit_code([1, 75]) == 1


# A stand-in rank: behaviour chosen per rank by argv[1] ("<rank0>,<rank1>").
RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    from agpo_megatron.runtime.launch import write_error
    rank = int(os.environ["RANK"])
    what = sys.argv[1].split(",")[rank]
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    if what == "error":
        if not write_error("agpo train: error: data.train.path=x.jsonl: not found"):
            print("NO SUPERVISOR", flush=True)
        os._exit(2)
    if what == "hang":  # the watchdog's exit, after a while
        time.sleep(0.5)
        os._exit(124)
    if what == "stopped":  # a rank that never answers again
        os.kill(os.getpid(), signal.SIGSTOP)
    if what == "wait":  # a preemptible rank: saves and exits 75 on SIGTERM/SIGUSR1
        def stop(signum, frame):
            open(os.path.join(sys.argv[2], f"rank{rank}.{signal.Signals(signum).name}"), "w").close()
            os._exit(75)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGUSR1, stop)
        open(os.path.join(sys.argv[2], f"rank{rank}.ready"), "w").close()
    while True:
        time.sleep(0.1)
    """
)


def _supervise(tmp_path: Path, behaviour: str, capfd) -> tuple[int, str]:
    cmd = [sys.executable, "-c", RANK, behaviour, str(tmp_path)]
    rc = Supervisor(cmd, 2, env={"PYTHONPATH": str(ROOT)}, grace_s=1.0).run()
    return rc, capfd.readouterr().err


@pytest.mark.slow  # starts processes
@pytest.mark.timeout(60)
def test_user_error_on_every_rank_prints_one_line_and_exits_2(tmp_path, capfd):
    rc, err = _supervise(tmp_path, "error,error", capfd)
    assert rc == 2
    assert err.count("agpo train: error: data.train.path=x.jsonl: not found") == 1, err


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_failed_rank_takes_the_waiting_one_down_after_the_grace(tmp_path, capfd):
    rc, err = _supervise(tmp_path, "error,sleep", capfd)  # the peer would wait in a collective forever
    assert rc == 2 and err.count("agpo train: error:") == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_hang_kills_the_stopped_rank_at_once_and_exits_124(tmp_path, capfd):
    rc, err = _supervise(tmp_path, "hang,stopped", capfd)  # SIGSTOP: only SIGKILL ends it
    assert rc == 124
    assert "the watchdog fired (exit 124); killed the rank(s) still running: 1" in err


SUPERVISOR = textwrap.dedent(
    """
    import sys
    from agpo_megatron.runtime.launch import Supervisor
    # A fixed port: the stand-in ranks meet nowhere (and free_port would import torch).
    sys.exit(Supervisor([sys.executable, "-c", sys.argv[1], "wait,wait", sys.argv[2]], 2, master_port=29400).run())
    """
)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_signals_to_the_supervisor_reach_every_rank(tmp_path, sig):
    """SIGUSR1/SIGTERM are forwarded as they are, Ctrl-C as SIGTERM; the ranks save and exit 75."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, RANK, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 75
    got = "SIGTERM" if sig == signal.SIGINT else sig.name
    assert sorted(p.name for p in tmp_path.glob("rank*.SIG*")) == [f"rank0.{got}", f"rank1.{got}"]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ranks_save_and_stop_when_the_supervisor_is_killed(tmp_path):
    """kill -9 of the supervisor (OOM killer, a lost login shell) leaves no rank training unsupervised."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, RANK, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while sorted(p.name for p in tmp_path.glob("rank*.SIG*")) != ["rank0.SIGTERM", "rank1.SIGTERM"]:
        assert time.monotonic() < deadline, sorted(p.name for p in tmp_path.iterdir())
        time.sleep(0.05)
