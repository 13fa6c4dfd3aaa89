"""Step folders under `checkpoint.save_dir` that a kill at any moment cannot corrupt.

    save_dir/
      latest                    "step_000004": the newest complete step folder (replaced atomically)
      step_000004/              a complete checkpoint; never written into again
      initial_weights/          the actor's starting weights, when they have no path of their own
      .tmp-step_000005-<id>/    a save in progress, or one killed midway (removed at the next start)

Commit protocol (filesystem only; the collective part is in train/run_checkpoint.py):

1. Every file of step N is written into `.tmp-step_N-<id>` in save_dir itself (same filesystem, so
   the rename below is atomic), and fsynced; `COMPLETE_MARKER` is written last.
2. The folder is renamed to `step_N`: this rename is the commit point. Before it, a kill leaves a
   `.tmp-*` folder that the next start deletes; after it, the checkpoint is complete.
3. `latest` is rewritten (temporary file, fsync, `os.replace`, fsync of the directory).
4. Only then are step folders beyond the newest `keep_last` deleted: each is first renamed to a
   `.tmp-delete-*` name, so a kill during the deletion never leaves a half-deleted `step_*` folder.

`newest_complete` trusts a folder, not `latest`: a kill between 2 and 3 leaves a complete step
folder that `latest` does not name yet; the next start picks it up and repairs `latest`.

Test hook: `AGPO_CKPT_KILL_AT=<point>:<step>[:<rank>]` makes that rank SIGKILL itself at one named
point of the save of that step (`kill_point`), to test that a kill anywhere leaves the previous
checkpoint loadable. Points, in save order: 'shards' (model, optimizer and RNG files written, no
run state yet), 'before_rename', 'before_latest', 'after_latest'.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from pathlib import Path

LATEST = "latest"
INITIAL = "initial_weights"
TMP_PREFIX = ".tmp-"
COMPLETE_MARKER = "run_state.json"
"""Written last into a step folder; a step folder without it is not a resumable run checkpoint."""
KILL_ENV = "AGPO_CKPT_KILL_AT"
KILL_POINTS = ("shards", "before_rename", "before_latest", "after_latest")

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: str | Path) -> int | None:
    """N for a folder named step_N, else None."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def tmp_name(final_name: str) -> str:
    """A fresh temporary folder name for `final_name` (unique per save attempt)."""
    return f"{TMP_PREFIX}{final_name}-{uuid.uuid4().hex[:8]}"


def kill_point(point: str, step: int, rank: int = 0) -> None:
    """SIGKILL this process here if `AGPO_CKPT_KILL_AT` names this point, step and rank (tests only)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] not in KILL_POINTS or len(parts) not in (2, 3):
        raise ValueError(f"{KILL_ENV}={spec!r}: expected <point>:<step>[:<rank>] with point in {KILL_POINTS}")
    if parts[0] == point and int(parts[1]) == step and int(parts[2] if len(parts) == 3 else 0) == rank:
        os.write(2, f"[agpo] {KILL_ENV}: killing rank {rank} at {point} of step {step}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root`, folders after their contents.

    NOTE: on a shared filesystem this flushes what this node wrote; each rank fsyncs the files it
    wrote itself (the checkpoint writer does, with `sync_files=True`).
    """
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_file(os.path.join(dirpath, f))
        fsync_dir(dirpath)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def complete_steps(save_dir: str | Path) -> list[Path]:
    """The complete step folders under `save_dir`, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if step_of(p) is not None and p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def read_latest(save_dir: str | Path) -> Path | None:
    """The folder `latest` names, or None when there is no `latest` file."""
    file = Path(save_dir) / LATEST
    if not file.is_file():
        return None
    return Path(save_dir) / file.read_text().strip()


def newest_complete(save_dir: str | Path) -> Path | None:
    """The newest complete step folder (see the module docstring for why not just `latest`)."""
    steps = complete_steps(save_dir)
    return steps[-1] if steps else None


def clean_stale(save_dir: str | Path) -> list[str]:
    """Delete what killed saves left behind (`.tmp-*`); returns their names. Run it before any save."""
    save_dir = Path(save_dir)
    removed = []
    if save_dir.is_dir():
        for p in save_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p.name)
    return removed


def remove_tree(path: str | Path) -> None:
    """Delete a folder this process wrote (an abandoned save); what cannot be deleted is left for
    `clean_stale` at the next start."""
    shutil.rmtree(path, ignore_errors=True)


def commit(tmp: str | Path, step: int, keep_last: int = 0) -> Path:
    """Steps 2-4 of the protocol for a fully written and fsynced `tmp` folder; returns step_N."""
    tmp = Path(tmp)
    save_dir, final = tmp.parent, tmp.parent / step_name(step)
    if not is_complete(tmp):
        raise RuntimeError(f"{tmp}: no {COMPLETE_MARKER}; refusing to commit an incomplete checkpoint")
    if final.exists():  # os.rename would silently replace an empty folder
        raise FileExistsError(f"{final} already exists; a step folder is never written into again")
    kill_point("before_rename", step)
    os.rename(tmp, final)
    fsync_dir(save_dir)
    kill_point("before_latest", step)
    publish_latest(save_dir, final)
    kill_point("after_latest", step)
    prune(save_dir, keep_last)
    return final


def publish_latest(save_dir: str | Path, folder: str | Path) -> None:
    write_atomic(Path(save_dir) / LATEST, Path(folder).name + "\n")


def prune(save_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete step folders (0 = keep all); returns their names."""
    if keep_last <= 0:
        return []
    old = complete_steps(save_dir)[:-keep_last]
    for p in old:
        doomed = p.with_name(f"{TMP_PREFIX}delete-{p.name}-{uuid.uuid4().hex[:8]}")
        os.rename(p, doomed)  # atomic: from here on it is no longer a step folder
        shutil.rmtree(doomed)
    return [p.name for p in old]


def replace_folder(tmp: str | Path, final: str | Path) -> None:
    """Put the written and fsynced `tmp` at `final`, replacing an existing `final` (initial weights).

    Two renames, not one: a kill between them leaves no `final` and a complete `.tmp-` copy that
    the next start deletes; a fresh start then writes `final` again.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)
