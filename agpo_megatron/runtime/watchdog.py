"""A per-rank watchdog: a step that does not finish in time ends the process (issue 11).

A rank stopped by the OS, or stuck in a collective whose peer is stopped, blocks forever in
gloo/NCCL: the process-group timeout is sized for the slowest legitimate collective (a 72B
checkpoint load, `parallel.timeout_s`), far longer than any step. The watchdog bounds the step
instead: every rank beats once per finished step, and a thread ends the process with one line
naming the phase it was in when `parallel.step_timeout_s` passes without a beat. torchrun/srun
then take the rest of the job down (`--kill-on-bad-exit`).

NOTE: it exits with `os._exit`, not an exception: the main thread is inside a C++ collective that
no Python exception can interrupt.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

EXIT_HUNG = 124
"""Exit code of a rank the watchdog ended (the same as `timeout(1)`'s)."""


class StepWatchdog:
    def __init__(
        self,
        timeout_s: float,
        *,
        phase: Callable[[], str] = lambda: "?",
        rank: int = 0,
        poll_s: float | None = None,
        first_step: int = 1,
        echo: TextIO | None = None,
    ):
        """`phase()` names what the rank is doing (e.g. `PhaseTimer.current`), read when it fires.
        `first_step`: the step running at `start()`; each `beat()` moves to the next. `echo`: a
        second stream for the line (the console, when stderr goes to a log file)."""
        self.timeout_s = timeout_s
        self.phase = phase
        self.rank = rank
        self.step = first_step
        self.echo = echo
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(timeout_s / 20, 0.05))
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="agpo-step-watchdog", daemon=True)

    def start(self) -> StepWatchdog:
        """Start watching (a no-op with `timeout_s` 0: the watchdog is off)."""
        self._last = time.monotonic()
        if self.timeout_s > 0:
            self._thread.start()
        return self

    @property
    def backstop_s(self) -> float:
        """The collective timeout to set while steps run (0: off): later than the watchdog can fire.

        NOTE: a collective that starts right after a beat and times out at `timeout_s` raced the
        watchdog (its line printed, then the gloo error won and the rank exited 1, not 124; seen in
        CI). The watchdog is the one judge of a hang; the collective timeout only backs it up, for a
        rank whose watchdog thread cannot run, so it waits two polls and 5 s longer.
        """
        return self.timeout_s + 2 * self.poll_s + 5.0 if self.timeout_s > 0 else 0.0

    def beat(self) -> None:
        """A step finished: the clock restarts."""
        self._last = time.monotonic()
        self.step += 1

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                line = (
                    f"rank {self.rank}: no training step finished in {idle:.0f} s "
                    f"(parallel.step_timeout_s={self.timeout_s:g}); stuck in {self._where()}: "
                    f"a peer rank is likely hung or stopped. Exiting with code {EXIT_HUNG}.\n"
                )
                # Exit now, before the peer's failure can surface here as a gloo/NCCL traceback.
                for stream in (sys.stderr, self.echo):
                    if stream is not None:
                        stream.write(line)
                        stream.flush()
                sys.stdout.flush()
                os._exit(EXIT_HUNG)

    def _where(self) -> str:
        """E.g. "'update' at step 7"; a phase that names its own step (a save after the beat) keeps it."""
        phase = self.phase()
        return f"'{phase}'" if "step" in phase else f"'{phase}' at step {self.step}"
