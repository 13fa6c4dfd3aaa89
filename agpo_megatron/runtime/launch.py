"""`agpo train --nproc-per-node N`: a thin supervisor that starts this node's ranks itself and gives
the user one exit code (issue 20).

Under torchrun, the ranks' exit codes (75 preempted, 124 hung, 2 user error) became torchrun's 1
with about 40 lines of `ChildFailedError`, SIGUSR1 killed torchrun and left the ranks running
unsupervised, and a stopped rank was killed 30 s after the watchdog had fired on its peers. This
supervisor replaces torchrun for one node (or one node of several, with a static rendezvous:
`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`, as Slurm gives them):

- it spawns `python -m agpo_megatron.cli train ...` per local rank with RANK, LOCAL_RANK,
  WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, all in one new process group;
- SIGTERM and SIGUSR1 are forwarded to every rank (which save at the next step boundary and exit
  75); a first SIGINT (Ctrl-C) is forwarded as SIGTERM, a second one kills the ranks; a supervisor
  that dies (even by SIGKILL) leaves no rank behind: each gets SIGTERM (PR_SET_PDEATHSIG);
- a rank that exits 124 (its watchdog fired: a peer is hung or stopped) gets the others killed at
  once; a rank that fails otherwise gets them killed after `GRACE_S` (peers may wait on it in a
  collective that no signal interrupts); ranks that were preempted are waited for;
- each rank writes its one-line error into a folder (`ERROR_DIR_ENV`) instead of the terminal;
  the supervisor prints each distinct line once;
- the exit code: 124 if any rank hung, else 2 if any rank had a user error, else 75 if the ranks
  were preempted, else 0 if all succeeded, else 1.

The raw torchrun form keeps working (the ranks print their own lines) but loses the exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agpo_megatron.runtime.watchdog import EXIT_HUNG

# NOTE: not imported from runtime/preempt.py, which imports torch: a rank's error path and the
# supervisor's tests stay light. tests/runtime/test_launch.py checks that the two agree.
EXIT_PREEMPTED = 75
EXIT_USER_ERROR = 2
ERROR_DIR_ENV = "AGPO_ERROR_DIR"
"""Set by the supervisor: a rank writes its one-line error to `<dir>/rank_<RANK>.txt`."""
LOCK_HELD_ENV = "AGPO_RUN_LOCK_HELD"
"""Set by the supervisor of node 0, which holds the run lock itself: the ranks do not take it."""
GRACE_S = 10.0
"""How long the other ranks may take to exit on their own after one rank failed (not hung)."""
_POLL_S = 0.05


def exit_code(codes: list[int | None]) -> int:
    """The one exit code of the run from the ranks' own codes (None: killed by the supervisor)."""
    own = [c for c in codes if c is not None]
    if EXIT_HUNG in own:
        return EXIT_HUNG
    if EXIT_USER_ERROR in own:
        return EXIT_USER_ERROR
    if own and all(c == EXIT_PREEMPTED for c in own):
        return EXIT_PREEMPTED
    if own and len(own) == len(codes) and all(c == 0 for c in own):
        return 0
    return 1


def write_error(line: str) -> bool:
    """Under the supervisor: hand this rank's error line to it (True); else False (print it yourself)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    try:
        Path(folder, f"rank_{int(os.environ.get('RANK', '0')):05d}.txt").write_text(line.rstrip("\n") + "\n")
    except OSError:
        return False
    return True


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (even by SIGKILL), so the ranks
    save and stop instead of training on unsupervised (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(
        self,
        cmd: list[str],
        nproc: int,
        *,
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        env: dict[str, str] | None = None,
        grace_s: float = GRACE_S,
    ):
        """`cmd`: one rank's command line (the same for all; the rank comes from the environment)."""
        self.cmd, self.nproc, self.grace_s = cmd, nproc, grace_s
        self.nnodes, self.node_rank = nnodes, node_rank
        from agpo_megatron.runtime.parallel import free_port

        self.master_addr, self.master_port = master_addr, master_port or free_port()
        self.env = {**os.environ, **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.killed: set[int] = set()
        self._interrupts = 0

    def _forward(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                self._kill_all()
                return
            signum = signal.SIGTERM  # Ctrl-C: save at the next step boundary, like a scheduler's warning
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                self.killed.add(i)
                try:
                    p.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        errors = tempfile.mkdtemp(prefix="agpo-errors-")
        world = self.nproc * self.nnodes
        old = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            for local in range(self.nproc):
                env = {
                    **self.env,
                    "RANK": str(self.node_rank * self.nproc + local),
                    "LOCAL_RANK": str(local),
                    "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(self.nproc),
                    "GROUP_RANK": str(self.node_rank),
                    "MASTER_ADDR": self.master_addr,
                    "MASTER_PORT": str(self.master_port),
                    ERROR_DIR_ENV: errors,
                }
                # One new process group: the terminal's Ctrl-C reaches the supervisor only, which decides.
                group = 0 if not self.procs else self.procs[0].pid
                self.procs.append(
                    subprocess.Popen(self.cmd, env=env, process_group=group, preexec_fn=_term_with_parent)
                )
            codes = self._wait()
        finally:
            self._kill_all()
            for p in self.procs:
                p.wait()
            for s, h in old.items():
                signal.signal(s, h)
        self._print_errors(Path(errors), codes)
        return exit_code([None if i in self.killed else c for i, c in enumerate(codes)])

    def _wait(self) -> list[int]:
        deadline = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return [int(c) for c in codes]  # type: ignore[arg-type]  # all set
            failed = [c for c in codes if c not in (None, 0, EXIT_PREEMPTED)]
            if (
                EXIT_HUNG in failed and not self.killed
            ):  # the watchdog fired: whoever is left is hung or waits on the hung one
                hung = [i for i, c in enumerate(codes) if c is None]
                self._kill_all()
                print(
                    f"agpo train: the watchdog fired (exit {EXIT_HUNG}); killed the rank(s) still running: "
                    f"{', '.join(str(self.node_rank * self.nproc + i) for i in hung)}",
                    file=sys.stderr,
                    flush=True,
                )
            elif failed and deadline is None:
                deadline = time.monotonic() + self.grace_s
            elif deadline is not None and time.monotonic() > deadline:
                self._kill_all()
            time.sleep(_POLL_S)

    def _print_errors(self, folder: Path, codes: list[int]) -> None:
        seen: list[str] = []
        for f in sorted(folder.glob("rank_*.txt")):
            for line in f.read_text(errors="replace").splitlines():
                if line and line not in seen:
                    seen.append(line)
            f.unlink()
        for line in seen:
            print(line, file=sys.stderr, flush=True)
        try:
            folder.rmdir()
        except OSError:
            pass
