"""What a person sees versus what goes to a log file: the demo's console holds progress bars and
the final table; library output (vLLM, Megatron, torch logging, Python warnings, and anything a
C++ extension writes to fd 1/2) goes to a per-rank file.

`route_to_file(path)` redirects the process's file descriptors 1 and 2 to `path` (so output
from loggers and handlers created before the call, and from native code, lands there too) and
keeps a duplicate of the original stdout as the console stream (`console()`), which the progress
bar and the demo's table use. Without a call, `console()` is `sys.stderr`, as before.

Departures: none (no upstream counterpart). Choices: the console keeps the terminal's original
stdout, so a rank's tqdm bar and the final table print in the order they are written; a failing
rank's traceback goes to its file and, via `report_failure`, to the console too.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import TextIO

_console: TextIO | None = None
_log_path: Path | None = None


def console() -> TextIO:
    """The stream for output meant for a person (progress bars, tables)."""
    return _console if _console is not None else sys.stderr


def route_to_file(path: str | Path) -> Path:
    """Send this process's stdout/stderr (fds 1 and 2) to `path`; `console()` keeps the terminal.

    Idempotent per process: a second call only moves the log to the new file.
    """
    global _console, _log_path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if _console is None:
        _console = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log_path = path
    return path


def log_path() -> Path | None:
    """The file `route_to_file` sends library output to (None when not routed)."""
    return _log_path


def report_failure(rank: int) -> None:
    """Print the current exception to the log (stderr) and, when routed, to the console as well,
    with the log file's name: an error must not hide in a file."""
    text = traceback.format_exc()
    sys.stderr.write(text)
    sys.stderr.flush()
    if _console is not None:
        _console.write(f"[rank {rank}] failed; its full log: {_log_path}\n{text}")
        _console.flush()
