"""A run owns its folders (issue 20): a second run into a locked folder fails at once, naming the
holder; a lock whose process is gone is taken over with one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agpo_megatron.runtime import run_lock
from agpo_megatron.runtime.run_lock import LOCK_NAME, RunLockError, lock_run

ROOT = Path(__file__).resolve().parents[2]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from agpo_megatron.runtime.run_lock import lock_run
    lock = lock_run(sys.argv[1], sys.argv[2])
    print("LOCKED", flush=True)
    time.sleep(120)
    """
)


def _holder(out: Path, save: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(save)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242"},
    )
    assert p.stdout.readline().strip() == "LOCKED"
    return p


@pytest.mark.slow  # starts a process
@pytest.mark.timeout(60)
def test_a_second_run_fails_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out, save = tmp_path / "run", tmp_path / "run" / "ckpt"
    holder = _holder(out, save)
    try:
        with pytest.raises(RunLockError) as e:
            lock_run(out, save)
        msg = str(e.value)
        assert "\n" not in msg and f"logging.out_dir={out}" in msg
        assert f"pid {holder.pid} on {socket.gethostname()}, Slurm job 4242" in msg
        # The checkpoint folder alone is locked too (another out_dir, the same save_dir).
        with pytest.raises(RunLockError, match=f"checkpoint.save_dir={save} is in use by another run"):
            lock_run(tmp_path / "other", save)
        assert not (tmp_path / "other" / LOCK_NAME).read_text()  # the half-taken lock was given back
    finally:
        holder.send_signal(signal.SIGKILL)  # no release: the lock file still names the dead holder
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = lock_run(out, save)
    assert len(lock.notes) == 2 and f"took over the stale lock {out / LOCK_NAME}" in lock.notes[0]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / LOCK_NAME).read_text() == ""  # a clean end leaves nothing to take over
    again = lock_run(out, save)
    assert again.notes == []
    again.release()


def test_without_flock_the_lock_files_contents_decide(tmp_path, monkeypatch):
    """Some network filesystems refuse flock (ENOLCK): a live holder on this host still refuses the start."""

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    out = tmp_path / "run"
    out.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getppid(), "started": "then"}  # alive: our parent
    (out / LOCK_NAME).write_text(json.dumps(me))
    with pytest.raises(RunLockError, match=f"pid {os.getppid()} .*this filesystem has no file locks, so delete"):
        lock_run(out, None)
    other = {**me, "host": "another-node"}  # alive or not: nothing here can tell
    (out / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunLockError, match="on another-node"):
        lock_run(out, None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_NAME).write_text(json.dumps({**me, "pid": gone.pid}))
    lock = lock_run(out, None)
    assert lock.notes and "a run that is gone" in lock.notes[0]
    lock.release()
