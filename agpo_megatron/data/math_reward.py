"""Accuracy reward for math answers: extract the final answer, then check it against the gold.

A response is scored in three steps:

1. **Extract** the final answer (:func:`extract_answer`): the content of the last ``\\boxed{...}``
   (or ``\\fbox{...}``), else the number after the last ``#### `` (GSM8K style). A response
   with neither is *unformatted* and scores 0.
2. **Fast path**, in this process: if the extracted answer and the gold are the same string
   (up to whitespace), or are both plain decimal numbers, the check is decided here without
   any worker round trip. That decides most GSM8K checks and many MATH ones.
3. **Symbolic check** with ``math-verify`` (``parse`` + ``verify``, gold and answer both wrapped
   in ``\\boxed{}`` so plain numbers and LaTeX parse alike) in a :class:`VerifierPool` worker
   process, under a hard per-check deadline.

Why worker processes: sympy can take unbounded time on adversarial expressions (a model will
eventually emit ``10^{10^{10}}``), and math-verify's own timeout relies on ``signal.alarm``,
which only works in the main thread of the main interpreter, while the trainer may score from
any thread. A worker that misses its deadline is killed and replaced; its check scores 0 and
is counted in ``num_timeouts``. Workers use the ``spawn`` start method, so the parent's CUDA
context and threads are never forked; as with any ``spawn`` use, the entry script must guard
its top level with ``if __name__ == "__main__":``.

This module deliberately does not import torch at module level: workers import it (to find
the check function), and keeping torch out keeps worker start-up around a second and their
memory small.
"""

import atexit
import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckOutcome",
    "RewardResult",
    "VerifierPool",
    "default_num_workers",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k",
    "get_default_pool",
    "gold_from_gsm8k_answer",
    "math_verify_equal",
    "score",
    "score_batch",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

# `\s*` because `\boxed {x}` is valid LaTeX; requiring the `{` rejects e.g. `\boxedfoo`.
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A GSM8K number: optional sign, digits possibly grouped with commas, optional decimal part.
# The trailing `\d+` makes `18.` stop before the sentence-final period.
_GSM8K_NUMBER_RE = re.compile(r"\s*\$?\s*([+-]?[\d,]*\.?\d+)")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, stripped.

    Braces are matched with a depth counter, so nested groups such as ``\\boxed{\\frac{1}{2}}``
    come back whole (``\\frac{1}{2}``). A backslash escapes the next character, so ``\\{`` and
    ``\\}`` (literal braces, e.g. in ``\\boxed{\\{1, 2\\}}``) do not change the depth.

    Returns None when there is no box, when the last box is unbalanced (typically a response
    truncated at the length limit: we do not fall back to an earlier box, which would reward an
    answer the model was about to revise), or when the box is empty.
    """
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    depth = 1
    i = start = matches[-1].end()
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[start:i].strip()
                return content or None
        i += 1
    return None


def extract_gsm8k(text: str) -> str | None:
    """The number after the last ``####`` in ``text`` (GSM8K's answer marker), or None.

    ``$`` signs, thousands commas and a trailing period are dropped: ``#### $1,234.`` gives
    ``1234``. Only the last marker counts; if no number follows it, the result is None.
    """
    pos = text.rfind("####")
    if pos < 0:
        return None
    match = _GSM8K_NUMBER_RE.match(text, pos + len("####"))
    if match is None:
        return None
    return match.group(1).replace(",", "")


def extract_answer(text: str) -> str | None:
    """The final answer of a response: :func:`extract_boxed` first, then :func:`extract_gsm8k`.

    Boxed wins because that is the format the prompt template asks for; ``####`` is kept as a
    fallback so that GSM8K-style reference solutions (and models fine-tuned on them) are still
    readable. None means the response is unformatted.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return extract_gsm8k(text)


def gold_from_gsm8k_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K row: the number after ``#### `` in its ``answer`` field."""
    gold = extract_gsm8k(answer_field)
    if gold is None:
        tail = answer_field[-80:]
        raise ValueError(f"GSM8K answer field has no '#### <number>' final answer (ends with {tail!r})")
    return gold


# ---------------------------------------------------------------------------------------------
# Equivalence checks
# ---------------------------------------------------------------------------------------------

# Digits with optional *well-formed* thousands separators. A bare `1,2` is not a number here:
# it is a two-element list in MATH answers, and stripping its comma would read it as 12.
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def _as_plain_number(text: str) -> Decimal | None:
    text = text.strip()
    if not text or not _PLAIN_NUMBER_RE.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _fast_check(extracted: str, gold: str) -> bool | None:
    """Decide ``extracted == gold`` without sympy when that is safe; None means "ask a worker"."""
    if "".join(extracted.split()) == "".join(gold.split()):
        return True
    a, b = _as_plain_number(extracted), _as_plain_number(gold)
    if a is not None and b is not None:
        return a == b
    return None


def math_verify_equal(extracted: str, gold: str) -> bool:
    """Whether ``extracted`` is mathematically equivalent to ``gold`` according to math-verify.

    Both strings are wrapped in ``\\boxed{}`` before ``math_verify.parse``: that makes plain
    numbers (``14/3``), bare LaTeX (``\\frac{14}{3}``) and assignments (``x = 3``, which verify
    reduces to its right-hand side) all parse. math-verify's own signal-based timeouts are
    disabled: this runs inside a :class:`VerifierPool` worker, whose deadline is enforced by
    killing the process.
    """
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{extracted}}}", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


class CheckOutcome(Enum):
    """How one check submitted to a :class:`VerifierPool` ended."""

    EQUAL = "equal"
    NOT_EQUAL = "not_equal"
    TIMEOUT = "timeout"
    """The check missed its deadline; the worker was killed and replaced."""
    WORKER_DIED = "worker_died"
    """The worker exited mid-check (e.g. killed by the OOM killer); it was replaced."""


_READY = "ready"


def _exit_when_orphaned(parent_pid: int, poll_s: float = 0.5) -> None:
    """A daemon thread that ends this worker once its parent is gone.

    NOTE (issue 11): a `kill -9` of the trainer does not always close the worker's pipe: any
    process forked from the trainer after the pipe was made (vLLM, compile workers) holds a copy
    of the parent's end, so `recv()` never sees EOF, and a worker inside a long sympy check reads
    nothing at all. Re-parenting is the one signal that always comes. Polling, rather than
    PR_SET_PDEATHSIG, because that fires when the spawning *thread* exits, not the process.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="agpo-verifier-orphan-watch", daemon=True).start()


def _worker_main(
    conn: multiprocessing.connection.Connection, check_fn: Callable[[str, str], bool], preload: tuple[str, ...],
    parent_pid: int,
) -> None:
    _exit_when_orphaned(parent_pid)
    # Ctrl-C reaches the whole process group; the parent handles it and tears the pool down, so
    # workers must not die first with a KeyboardInterrupt traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # math-verify warns once per process that its own timeouts are off, which is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Import sympy / the LaTeX parser before reporting ready, so that import time never counts
    # against the first check's deadline.
    for module in preload:
        importlib.import_module(module)

    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, ConnectionResetError):  # the parent went away (os._exit closes the pipe abruptly)
            return
        extracted, gold = task
        try:
            result = bool(check_fn(extracted, gold))
        except Exception:  # a check that raises is an answer we could not verify
            result = False
        conn.send(result)


@dataclass
class _Worker:
    """Parent-side handle of one worker process."""

    process: mp.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    """``time.monotonic()`` at spawn, for the start-up deadline."""
    ready: bool = False
    """Whether the worker has finished its imports and takes checks."""
    task: int | None = None
    """Index (into the current call's pairs) of the check it is running, if any."""
    deadline: float = math.inf
    """``time.monotonic()`` by which the running check must answer."""


class VerifierPool:
    """Persistent ``spawn`` worker processes running equivalence checks with hard deadlines.

    Each worker owns one pipe; the parent hands out one check at a time per worker and waits on
    all pipes with a timeout equal to the earliest deadline. A worker that misses its deadline
    is killed (SIGKILL: sympy does not check for interrupts) and a fresh one is spawned in its
    place without stalling the other workers. A check's deadline starts when it is handed to a
    worker, so time spent queued behind other checks does not count against it.

    Calls are serialised with a lock, so the pool may be shared between threads. It must not be
    used across ``fork``: a child process gets an error and should build its own pool.

    Args:
        num_workers: number of worker processes.
        check_fn: ``(extracted, gold) -> bool``; must be picklable by reference (a module-level
            function), since workers are spawned and import it.
        start_timeout_s: how long a worker may take to start (spawn + imports) before the pool
            gives up with an error.
        preload: modules each worker imports before it takes checks, so that their import time
            is not charged to the first check's deadline.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        check_fn: Callable[[str, str], bool] = math_verify_equal,
        start_timeout_s: float = 120.0,
        preload: Sequence[str] = ("math_verify",),
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self.num_workers = num_workers
        self.check_fn = check_fn
        self.start_timeout_s = start_timeout_s
        self.preload = tuple(preload)
        self.num_timeouts = 0
        """Checks that missed their deadline since the pool was built."""
        self.num_restarts = 0
        """Workers replaced after a timeout or a crash since the pool was built."""
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # daemon: workers must never outlive the trainer, even if close() is never reached.
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.check_fn, self.preload, os.getpid()), daemon=True,
            name="agpo-verifier"
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
            # interpreter teardown (slow with sympy loaded) or for a check still running.
            for worker in self._workers:
                self._kill(worker)
            self._workers.clear()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks ---------------------------------------------------------------------------------

    def check(self, pairs: Sequence[tuple[str, str]], *, timeout_s: float) -> list[CheckOutcome]:
        """Run ``check_fn(extracted, gold)`` for every pair, each under ``timeout_s`` seconds."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not pairs:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            if os.getpid() != self._pid:
                raise RuntimeError("VerifierPool was created in another process (fork); build a new pool in this one")
            if not self._workers:
                self._workers = [self._spawn() for _ in range(self.num_workers)]
            return self._run(pairs, timeout_s)

    def _run(self, pairs: Sequence[tuple[str, str]], timeout_s: float) -> list[CheckOutcome]:
        outcomes: list[CheckOutcome | None] = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        num_done = 0
        while num_done < len(pairs):
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    try:
                        worker.conn.send(pairs[task])
                    except OSError:  # died while idle (e.g. OOM killer): run the check on a fresh one
                        pending.appendleft(task)
                        self._replace(worker)
                        continue
                    worker.task, worker.deadline = task, now + timeout_s

            # Workers we are waiting on: those starting up and those running a check. Sleep until
            # one of them answers or the earliest of their deadlines passes.
            watched = {
                worker.conn: worker.deadline if worker.ready else worker.started_at + self.start_timeout_s
                for worker in self._workers
                if not worker.ready or worker.task is not None
            }
            wait_s = max(0.0, min(watched.values()) - time.monotonic())
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
                            self._fail(f"verifier worker exited during start-up (exit code {worker.process.exitcode})")
                        logger.warning("verifier worker died mid-check; replacing it")
                        outcomes[worker.task] = CheckOutcome.WORKER_DIED
                        num_done += 1
                        self._replace(worker)
                    else:
                        outcomes[worker.task] = CheckOutcome.EQUAL if message else CheckOutcome.NOT_EQUAL
                        num_done += 1
                        worker.task = None
                elif now >= watched[worker.conn]:
                    if not worker.ready:
                        self._fail(f"verifier worker did not start within {self.start_timeout_s}s")
                    outcomes[worker.task] = CheckOutcome.TIMEOUT
                    num_done += 1
                    self.num_timeouts += 1
                    logger.warning("answer check exceeded %.1fs: %r", timeout_s, pairs[worker.task])
                    self._replace(worker)
        return outcomes  # type: ignore[return-value]  # every slot is set once num_done == len(pairs)

    def _fail(self, message: str) -> NoReturn:
        # Drop every worker so that the next call starts from scratch instead of from a pool
        # with checks still in flight.
        for worker in self._workers:
            self._kill(worker)
        self._workers.clear()
        raise RuntimeError(message)


def default_num_workers() -> int:
    """Default worker count: one per CPU, at most 8 (checks are short; more buys little)."""
    return max(1, min(8, os.cpu_count() or 1))


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def get_default_pool(num_workers: int | None = None) -> VerifierPool:
    """The process-wide pool used when ``score``/``score_batch`` get no ``pool``.

    Built lazily (no processes exist until a check needs one) with ``num_workers`` workers,
    :func:`default_num_workers` if None. An existing pool is reused when ``num_workers`` is None
    or matches, and rebuilt when a different size is asked for or after a ``fork``.
    """
    global _default_pool
    with _default_pool_lock:
        pool = _default_pool
        usable = pool is not None and not pool._closed and pool._pid == os.getpid()
        if usable and (num_workers is None or num_workers == pool.num_workers):
            return pool
        if usable:
            pool.close()
        _default_pool = pool = VerifierPool(default_num_workers() if num_workers is None else num_workers)
        return pool


@atexit.register
def _close_default_pool() -> None:
    if _default_pool is not None:
        _default_pool.close()


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardResult:
    """The accuracy verdict for one response."""

    correct: bool
    """Whether the extracted answer is equivalent to the gold."""
    formatted: bool
    """Whether a final answer could be extracted (boxed or ``####``)."""
    extracted: str | None
    """The extracted final answer; None when unformatted."""
    timed_out: bool = False
    """Whether the equivalence check hit its deadline (then ``correct`` is False)."""


def _score_all(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float,
    pool: VerifierPool | None,
    num_workers: int | None,
) -> list[RewardResult]:
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} golds")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    for i, gold in enumerate(golds):
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"golds[{i}] must be a non-empty string, got {gold!r}")

    results: list[RewardResult | None] = [None] * len(responses)
    slow: list[tuple[int, str]] = []  # (index, extracted) of the checks the fast path left open
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        extracted = extract_answer(response)
        if extracted is None:
            results[i] = RewardResult(correct=False, formatted=False, extracted=None)
            continue
        verdict = _fast_check(extracted, gold)
        if verdict is None:
            slow.append((i, extracted))
        else:
            results[i] = RewardResult(correct=verdict, formatted=True, extracted=extracted)

    if slow:
        pool = pool if pool is not None else get_default_pool(num_workers)
        outcomes = pool.check([(extracted, golds[i]) for i, extracted in slow], timeout_s=timeout_s)
        for (i, extracted), outcome in zip(slow, outcomes, strict=True):
            results[i] = RewardResult(
                correct=outcome is CheckOutcome.EQUAL,
                formatted=True,
                extracted=extracted,
                timed_out=outcome is CheckOutcome.TIMEOUT,
            )
    return results  # type: ignore[return-value]  # every slot filled above


def score(response_text: str, gold: str, *, timeout_s: float = 5.0, pool: VerifierPool | None = None) -> RewardResult:
    """Score one response against its gold answer (see the module docstring for the steps).

    ``pool`` defaults to :func:`get_default_pool`; it is only touched when the fast path cannot
    decide.
    """
    return _score_all([response_text], [gold], timeout_s=timeout_s, pool=pool, num_workers=None)[0]


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
    num_workers: int | None = None,
    pool: VerifierPool | None = None,
) -> tuple["torch.Tensor", "torch.Tensor", dict[str, float]]:
    """Score many responses; the checks that need math-verify run in parallel on the pool.

    Returns:
        r_acc: float32 ``[N]``, 1.0 for a correct answer and 0.0 otherwise.
        formatted: bool ``[N]``, whether an answer could be extracted.
        metrics: ``frac_formatted``, ``frac_correct`` and ``num_timeouts`` (checks of this batch
            that hit the deadline).

    ``num_workers`` sizes the default pool (default :func:`default_num_workers`); it is ignored
    when an explicit ``pool`` is given.
    """
    import torch

    results = _score_all(responses, golds, timeout_s=timeout_s, pool=pool, num_workers=num_workers)
    r_acc = torch.tensor([float(r.correct) for r in results], dtype=torch.float32)
    formatted = torch.tensor([r.formatted for r in results], dtype=torch.bool)
    n = max(len(results), 1)
    metrics = {
        "frac_formatted": sum(r.formatted for r in results) / n,
        "frac_correct": sum(r.correct for r in results) / n,
        "num_timeouts": float(sum(r.timed_out for r in results)),
    }
    return r_acc, formatted, metrics
