"""A run owns its folders: an exclusive lock on `logging.out_dir` and `checkpoint.save_dir` (issue 20).

Two runs started into one folder used to interleave `metrics.jsonl`, skip each other's saves and
resume each other's checkpoints. Rank 0 now takes a lock on each folder before anything else
happens (`agpo train`, before the process group and any model exist); a second run fails at
once with one line naming the holder.

The lock is the file `<folder>/.agpo-lock`: `flock(LOCK_EX | LOCK_NB)` on it, and inside it the
holder's host, pid, SLURM job id and start time (what the refusal names). The kernel drops a
flock when its process dies, however it dies, so a lock file left by a killed run is stale by
construction: the next run takes it over and says so in one line.

Where `flock` does not work (some network filesystems answer ENOLCK or EOPNOTSUPP), the file's
contents are the lock: a holder on this host that is still alive refuses the start, a holder on
another host refuses it too (nothing here can see whether it is alive; the line says to delete
the file if that run is gone). Such a folder should not be shared by runs at all; the run
checkpointer also refuses a step folder another run committed while this one was going
(`train/run_checkpoint.py`), docs/reliability.md has the row.

NOTE: the lock file is never deleted, only emptied at release: unlinking a flocked file lets a
third process lock a new file of the same name while a second still holds the old inode.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

LOCK_NAME = ".agpo-lock"


class RunLockError(RuntimeError):
    """The folder is held by another run (the message names it), or cannot be locked."""


def _me() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _describe(h: dict[str, Any]) -> str:
    job = f", Slurm job {h['job_id']}" if h.get("job_id") else ""
    return f"pid {h.get('pid')} on {h.get('host')}{job}, started {h.get('started')}"


def _alive_here(h: dict[str, Any]) -> bool:
    """Whether the holder is a live process on this host (False for another host: unknown)."""
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """The locks of one run, held until `release()` or the process ends."""

    def __init__(self) -> None:
        self._held: list[tuple[Path, int]] = []
        self.notes: list[str] = []
        """One line per stale lock taken over (for the caller to print)."""

    def acquire(self, folder: str | Path, field: str) -> None:
        """Lock `folder` (created if needed) for this run; `field` names the config field it comes from."""
        folder = Path(folder).resolve()
        if any(f == folder for f, _ in self._held):  # out_dir and save_dir may be the same folder
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunLockError(f"{field}={folder}: cannot create its lock file: {e.strerror or e}") from None
        file = folder / LOCK_NAME
        try:
            holder = _read(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock_ok = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockError(
                        f"{field}={folder} is in use by another run ({_describe(holder)}); wait for it to end, "
                        f"or give this run its own {field}"
                    ) from None
                flock_ok = False  # ENOLCK / EOPNOTSUPP: the filesystem has no locks; the contents decide
            if holder and not flock_ok and (_alive_here(holder) or holder.get("host") != socket.gethostname()):
                raise RunLockError(
                    f"{field}={folder} is in use by another run ({_describe(holder)}; this filesystem has no "
                    f"file locks, so delete {file} if that run is gone)"
                )
            if holder:
                self.notes.append(f"took over the stale lock {file} of a run that is gone ({_describe(holder)})")
            _write(fd, _me())
        except BaseException:
            os.close(fd)
            raise
        self._held.append((folder, fd))

    def release(self) -> None:
        """Empty and unlock every lock file (a clean end leaves nothing for the next run to take over)."""
        while self._held:
            _, fd = self._held.pop()
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # drops the flock


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        data = {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
    return data if isinstance(data, dict) else {}


def _write(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


def lock_run(out_dir: str | Path, save_dir: str | Path | None) -> RunLock:
    """The locks of a training run: its `logging.out_dir` and its `checkpoint.save_dir` (if set)."""
    lock = RunLock()
    try:
        lock.acquire(out_dir, "logging.out_dir")
        if save_dir:
            lock.acquire(save_dir, "checkpoint.save_dir")
    except BaseException:
        lock.release()
        raise
    return lock
