"""A pool of persistent `spawn` worker processes that run one function under hard deadlines.

`DeadlinePool` runs `fn(*task)` for every task of a call, in parallel across its workers,
with two limits:

- a **per-task** deadline (`timeout_s`), which starts when the task is handed to a worker, so
  time spent queued behind other tasks does not count against it;
- an optional **per-call** budget (`budget_s`), which starts when the first task is handed out
  (so pool start-up does not count): when it runs out, running tasks are cut off and tasks not yet
  started are not started. The call then returns within about `budget_s` however many tasks are
  hostile, instead of `ceil(n / num_workers) * timeout_s`.

A worker that misses a deadline is killed (SIGKILL: the function need not check for interrupts;
sympy, the first user, does not) and a fresh one is spawned in its place without stalling the
others. Each task ends with one `Outcome`.

Why processes rather than threads or `signal.alarm`: only a process can be stopped from outside
in the middle of C code, and `signal.alarm` only works in the main thread of the main
interpreter. Workers use the `spawn` start method, so the parent's CUDA context and threads are
never forked; as with any `spawn` use, the entry script must guard its top level with
`if __name__ == "__main__":`.

This module does not import torch: workers import it, and keeping torch out keeps worker start-up
around a second and their memory small.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn, Self

__all__ = ["DeadlinePool", "Outcome", "Status", "default_num_workers"]

logger = logging.getLogger(__name__)


class Status(Enum):
    """How one task submitted to a `DeadlinePool` ended."""

    DONE = "done"
    """`fn` returned; `Outcome.value` holds what it returned."""
    FAILED = "failed"
    """`fn` raised; `Outcome.value` holds the exception's repr. The worker is kept."""
    TIMEOUT = "timeout"
    """The task missed its deadline (its own, or the call's budget); the worker was killed and replaced."""
    OVER_BUDGET = "over_budget"
    """The call's budget ran out before the task was handed to a worker; it never ran."""
    WORKER_DIED = "worker_died"
    """The worker exited mid-task (e.g. killed by the OOM killer); it was replaced."""


@dataclass(frozen=True)
class Outcome:
    """The end of one task: its `Status` and, when `DONE`, the function's return value."""

    status: Status
    value: Any = None

    @property
    def missed_deadline(self) -> bool:
        """Whether the task was cut off or never run for lack of time."""
        return self.status in (Status.TIMEOUT, Status.OVER_BUDGET)


_READY = "ready"


def _exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    """A daemon thread that ends this worker once its parent is gone.

    NOTE (issue 11): a `kill -9` of the trainer does not always close the worker's pipe: any
    process forked from the trainer after the pipe was made (vLLM, compile workers) holds a copy
    of the parent's end, so `recv()` never sees EOF, and a worker inside a long task reads
    nothing at all. Re-parenting is the one signal that always comes. Polling, rather than
    PR_SET_PDEATHSIG, because that fires when the spawning *thread* exits, not the process.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="agpo-pool-orphan-watch", daemon=True).start()


def _worker_main(
    conn: multiprocessing.connection.Connection,
    fn: Callable[..., Any],
    preload: tuple[str, ...],
    parent_pid: int,
) -> None:
    _exit_when_orphaned(parent_pid)
    # Ctrl-C reaches the whole process group; the parent handles it and tears the pool down, so
    # workers must not die first with a KeyboardInterrupt traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Import heavy modules before reporting ready, so that import time never counts against the
    # first task's deadline.
    for module in preload:
        importlib.import_module(module)

    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, ConnectionResetError):  # the parent went away (os._exit closes the pipe abruptly)
            return
        try:
            reply = (Status.DONE, fn(*task))
        except Exception as e:  # noqa: BLE001 -- any failure of fn is the task's result, not the worker's
            reply = (Status.FAILED, repr(e))
        conn.send(reply)


@dataclass
class _Worker:
    """Parent-side handle of one worker process."""

    process: mp.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    """`time.monotonic()` at spawn, for the start-up deadline."""
    ready: bool = False
    """Whether the worker has finished its imports and takes tasks."""
    task: int | None = None
    """Index (into the current call's tasks) of the task it is running, if any."""
    deadline: float = math.inf
    """`time.monotonic()` by which the running task must answer."""


class DeadlinePool:
    """Persistent `spawn` worker processes running `fn(*task)` with hard deadlines.

    Each worker owns one pipe; the parent hands out one task at a time per worker and waits on
    all pipes with a timeout equal to the earliest deadline. Workers are started on first use.

    Calls are serialised with a lock, so the pool may be shared between threads. It must not be
    used across `fork`: a child process gets an error and should build its own pool.

    `num_workers` worker processes run `fn`, which must be picklable by reference (a module-level
    function: workers are spawned and import it), as must its arguments and result.
    `start_timeout_s`: how long a worker may take to start (spawn + imports) before the pool gives
    up with an error. `preload`: modules each worker imports before it takes tasks, so that their
    import time is not charged to the first task's deadline. `name`: the workers' process name,
    and the pool's name in log lines.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        fn: Callable[..., Any],
        start_timeout_s: float = 120.0,
        preload: Sequence[str] = (),
        name: str = "agpo-pool",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self.num_workers = num_workers
        self.fn = fn
        self.start_timeout_s = start_timeout_s
        self.preload = tuple(preload)
        self.name = name
        self.num_timeouts = 0
        """Tasks that missed their deadline (or the call's budget) since the pool was built."""
        self.num_restarts = 0
        """Workers replaced after a timeout or a crash since the pool was built."""
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Whether this process may still use the pool (not closed, not a forked copy)."""
        return not self._closed and self._pid == os.getpid()

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # daemon: workers must never outlive the trainer, even if close() is never reached.
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.fn, self.preload, os.getpid()), daemon=True, name=self.name
        )
        process.start()
        child_conn.close()  # the child holds its end; closing ours lets recv() see EOF if it dies
        return _Worker(process=process, conn=parent_conn, started_at=time.monotonic())

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        self._workers[self._workers.index(worker)] = self._spawn()
        self.num_restarts += 1

    def close(self) -> None:
        """Stop all workers. Idempotent; the pool cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:  # a forked copy does not own these processes
                return
            # Workers hold no state worth a graceful exit, and a polite shutdown would wait for
            # interpreter teardown (slow with sympy loaded) or for a task still running.
            for worker in self._workers:
                self._kill(worker)
            self._workers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_workers(self) -> None:  # under self._lock
        if self._closed:
            raise RuntimeError(f"{self.name} pool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self.name} pool was created in another process (fork); build a new pool in this one")
        if not self._workers:
            self._workers = [self._spawn() for _ in range(self.num_workers)]

    def start(self) -> None:
        """Start every worker (and any replacement still starting) and wait until all take tasks.

        Optional: a call starts the workers it needs. Useful before timing-sensitive work, and so
        that every worker is idle and ready when the next call begins.
        """
        with self._lock:
            self._ensure_workers()
            for worker in self._workers:
                if worker.ready:
                    continue
                if not worker.conn.poll(max(0.0, worker.started_at + self.start_timeout_s - time.monotonic())):
                    self._fail(f"{self.name} worker did not start within {self.start_timeout_s}s")
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    message = None
                if message != _READY:
                    self._fail(f"{self.name} worker exited during start-up (exit code {worker.process.exitcode})")
                worker.ready = True

    # -- tasks ----------------------------------------------------------------------------------

    def run(self, tasks: Sequence[tuple], *, timeout_s: float, budget_s: float | None = None) -> list[Outcome]:
        """Run `fn(*task)` for every task, each under `timeout_s`, all under `budget_s` (None: no budget)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        if not tasks:
            return []
        with self._lock:
            self._ensure_workers()
            return self._run(tasks, timeout_s, math.inf if budget_s is None else budget_s)

    def _run(self, tasks: Sequence[tuple], timeout_s: float, budget_s: float) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        call_deadline = math.inf  # set when the first task is handed out
        num_done = 0

        def finish(task: int | None, outcome: Outcome) -> None:  # task: a busy worker's, never None
            nonlocal num_done
            assert task is not None
            outcomes[task] = outcome
            num_done += 1
            if outcome.missed_deadline:
                self.num_timeouts += 1

        while num_done < len(tasks):
            now = time.monotonic()
            if now >= call_deadline:  # the budget is spent: what has not started never will
                while pending:
                    finish(pending.popleft(), Outcome(Status.OVER_BUDGET))
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    try:
                        worker.conn.send(tasks[task])
                    except OSError:  # died while idle (e.g. OOM killer): run the task on a fresh one
                        pending.appendleft(task)
                        self._replace(worker)
                        continue
                    if call_deadline == math.inf:
                        call_deadline = now + budget_s
                    worker.task, worker.deadline = task, min(now + timeout_s, call_deadline)
            if num_done == len(tasks):
                break

            # Workers we are waiting on: those starting up and those running a task. Sleep until
            # one of them answers, the earliest of their deadlines passes, or (with tasks still
            # queued) the call's budget runs out.
            watched = {
                worker.conn: worker.deadline if worker.ready else worker.started_at + self.start_timeout_s
                for worker in self._workers
                if not worker.ready or worker.task is not None
            }
            wake = min([*watched.values(), call_deadline if pending else math.inf])
            wait_s = max(0.0, wake - time.monotonic())
            answered = set(multiprocessing.connection.wait(list(watched), timeout=wait_s))

            now = time.monotonic()
            for worker in list(self._workers):  # a copy: _replace swaps entries
                if worker.conn not in watched:
                    continue
                if worker.conn in answered:
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message == _READY:
                        worker.ready = True
                    elif message is None:  # the process exited
                        if not worker.ready:
                            code = worker.process.exitcode
                            self._fail(f"{self.name} worker exited during start-up (exit code {code})")
                        logger.warning("%s worker died mid-task; replacing it", self.name)
                        finish(worker.task, Outcome(Status.WORKER_DIED))
                        self._replace(worker)
                    else:
                        finish(worker.task, Outcome(*message))
                        worker.task = None
                elif now >= watched[worker.conn]:
                    if not worker.ready:
                        self._fail(f"{self.name} worker did not start within {self.start_timeout_s}s")
                    late = worker.task
                    assert late is not None  # a ready worker is watched only while it runs a task
                    logger.warning(
                        "%s task exceeded its deadline (%.1fs each, %.1fs per call): %r",
                        self.name,
                        timeout_s,
                        budget_s,
                        tasks[late],
                    )
                    finish(late, Outcome(Status.TIMEOUT))
                    self._replace(worker)
        return outcomes  # type: ignore[return-value]  # every slot is set once num_done == len(tasks)

    def _fail(self, message: str) -> NoReturn:
        # Drop every worker so that the next call starts from scratch instead of from a pool
        # with tasks still in flight.
        for worker in self._workers:
            self._kill(worker)
        self._workers.clear()
        raise RuntimeError(message)


def default_num_workers() -> int:
    """Default worker count: one per CPU, at most 8 (checks are short; more buys little)."""
    return max(1, min(8, os.cpu_count() or 1))
