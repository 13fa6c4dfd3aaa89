"""Output folders that appear whole or not at all: the converters write, then rename.

A converter writes into a fresh staging folder beside its output, `.<name>.tmp-<random>` in the
same parent. It is on the same filesystem, so the rename is atomic. The folder is moved into
place only once every file in it is written and fsynced. A kill -9 at any point leaves the
previous output as it was, plus the staging folder to delete.

An existing non-empty output is refused unless `overwrite` is given. With it, the new folder
replaces the old one whole, so no stale shard, index or optimizer state survives next to the new
files. Linux `renameat2(RENAME_EXCHANGE)` swaps the two folders in one step, and then the old one
is deleted. Where the filesystem cannot swap, the old folder is renamed aside
(`.<name>.old-<random>`), the new one renamed in, and the old one deleted. A crash between those
two renames leaves both complete folders in the parent, and never a mix of the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agpo_megatron.checkpoint import CheckpointError

FAULT_ENV = "AGPO_TEST_KILL_AT"
"""Test hook: a process whose env names a `fault_point` SIGKILLs itself there."""


def fault_point(name: str) -> None:
    """Die with SIGKILL here if the test hook names this point (the kill -9 tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_target(out: str | Path, *, overwrite: bool, inputs: tuple[Path, ...] = (), held: str = "") -> None:
    """Refuse an output that the conversion may not (re)place. Only reads, so every rank can call it.

    `inputs`: folders the conversion reads. The output may not be one of them, or hold or sit
    inside one. `held`: what the caller found in a non-empty `out`, for the message.
    """
    out = Path(out)
    for src in inputs:
        a, b = out.resolve(), Path(src).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise CheckpointError(f"{out}: the output folder may not be, hold or sit inside the input {src}")
    if out.is_symlink():  # replacing it would swap the link, not the folder it points to
        raise CheckpointError(f"{out}: is a symbolic link; pass the folder it points to")
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CheckpointError(f"{out}: cannot be created: {blocker} exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise CheckpointError(
            f"{out}: not empty{held}; choose a new output folder, or pass --overwrite to replace the whole folder"
        )


def make_staging(out: str | Path) -> Path:
    """A fresh, empty staging folder beside `out` (creating `out`'s parents)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.*-*") if p.is_dir())
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the output folder: {e.strerror or e}") from None
    if leftovers:
        print(
            f"note: {out.parent}: {', '.join(leftovers)}: left by an interrupted (or a running) conversion "
            "into the same folder; safe to delete once none runs",
            file=sys.stderr,
            flush=True,
        )
    return staging


def commit(staging: Path, out: str | Path) -> None:
    """Move the finished `staging` folder to `out`, replacing whatever folder is there."""
    out = Path(out)
    try:
        _fsync_tree(staging)
        fault_point("commit")
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            os.replace(staging, out)  # an empty folder is replaced by the rename itself
        elif _exchange(staging, out):
            shutil.rmtree(staging)  # it holds the old output now
        else:
            old = staging.with_name(staging.name.replace(".tmp-", ".old-", 1))
            os.rename(out, old)
            fault_point("commit:aside")
            os.rename(staging, out)
            shutil.rmtree(old)
        _fsync_dir(out.parent)
    except OSError as e:
        raise CheckpointError(
            f"{out}: cannot move the finished output into place from {staging}: {e.strerror or e}"
        ) from None


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged(out: str | Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """One process: check `out`, yield a staging folder to write into, then commit it.

    On an exception the staging folder is deleted and `out` is left untouched.
    """
    check_target(out, overwrite=overwrite, inputs=inputs)
    staging = make_staging(out)
    try:
        yield staging
    except CheckpointError as e:  # name the files as the user knows them, not the staging folder
        discard(staging)
        raise CheckpointError(str(e).replace(str(staging), str(out))) from None
    except BaseException:
        discard(staging)
        raise
    commit(staging, out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so the rename publishes durable data."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
