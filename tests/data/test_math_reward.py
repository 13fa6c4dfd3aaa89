"""Tests for answer extraction and the math-verify accuracy reward."""

import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest

from agpo_megatron.data.math_reward import (
    CheckOutcome,
    VerifierPool,
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    gold_from_gsm8k_answer,
    score,
    score_batch,
)
from tests.dist import pid_alive

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _misbehaving_check(extracted: str, gold: str) -> bool:
    """A check (run in a worker) that hangs when the gold is ``"hang"`` and crashes on ``"die"``."""
    if gold == "hang":
        time.sleep(600)
    if gold == "die":
        os._exit(1)
    return extracted == gold


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(2) as p:
        yield p


def _read_jsonl(name: str, n: int) -> list[dict]:
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    with path.open() as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


# -- extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\fbox{42}", "42"),
        (r"first \boxed{1}, then \fbox{2}, finally \boxed{3}", "3"),
        (r"\boxed {7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{ 5 }", "5"),
        (r"\boxed{1} and then \boxed{\frac{2}{", None),  # truncated last box: no fallback
        (r"\boxed{}", None),
        ("no box here", None),
        (r"\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is\n#### 1,234", "1234"),
        ("#### $5.", "5"),
        ("#### -3", "-3"),
        ("#### 2.50", "2.50"),
        ("#### 1\nlater\n#### 2", "2"),
        ("#### unknown", None),
        ("no marker 12", None),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


def test_extract_answer_prefers_boxed_over_gsm8k_marker():
    assert extract_answer("#### 3\nactually \\boxed{4}") == "4"
    assert extract_answer("#### 3") == "3"
    assert extract_answer("I think it is 3") is None


def test_gold_from_gsm8k_answer():
    assert gold_from_gsm8k_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    with pytest.raises(ValueError, match="no '#### <number>'"):
        gold_from_gsm8k_answer("The answer is 18.")


# -- scoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{14/3}", r"\frac{14}{3}", True),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
        (r"\boxed{x = 3}", "3", True),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\boxed{\frac{1}{3}}", "0.5", False),
        (r"\boxed{x = 4}", "3", False),
        # Fast path: plain numbers never reach a worker.
        ("#### 1,234", "1234", True),
        (r"\boxed{18.0}", "18", True),
        (r"\boxed{17}", "18", False),
        # `1,2` is a list, not a thousands-grouped 12.
        (r"\boxed{1,2}", "12", False),
    ],
)
def test_score_equivalence(pool, response, gold, correct):
    result = score(response, gold, pool=pool)
    assert result.correct is correct
    assert result.formatted and not result.timed_out


def test_unformatted_response_scores_zero(pool):
    result = score("The answer is 12.", "12", pool=pool)
    assert (result.correct, result.formatted, result.extracted) == (False, False, None)


def test_fast_path_never_touches_the_pool():
    closed = VerifierPool(1)
    closed.close()  # any use would raise
    assert score(r"\boxed{1,234}", "1234", pool=closed).correct
    assert score(r"\boxed{\frac{14}{3}}", r"\frac{14}{3}", pool=closed).correct
    with pytest.raises(RuntimeError, match="closed"):
        score(r"\boxed{0.5}", r"\frac{1}{2}", pool=closed)


def test_score_from_a_worker_thread_uses_default_pool():
    # math-verify's own signal-based timeout would fail outside the main thread.
    results = []
    thread = threading.Thread(target=lambda: results.append(score(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=30)))
    thread.start()
    thread.join(timeout=60)
    assert results and results[0].correct


def test_hanging_and_crashing_checks_score_zero_and_pool_recovers():
    with VerifierPool(2, check_fn=_misbehaving_check, preload=()) as hang_pool:
        # Start both workers first: start-up time is not part of a check's deadline.
        assert hang_pool.check([("a", "a"), ("a", "b")], timeout_s=30) == [CheckOutcome.EQUAL, CheckOutcome.NOT_EQUAL]

        start = time.monotonic()
        result = score(r"\boxed{x}", "hang", timeout_s=0.5, pool=hang_pool)
        elapsed = time.monotonic() - start
        assert result.timed_out and not result.correct and result.formatted
        assert elapsed < 0.5 + 1.0, f"timed-out check took {elapsed:.2f}s"
        assert hang_pool.num_timeouts == 1 and hang_pool.num_restarts == 1

        # The replacement worker serves the rest of a batch; only the hanging check fails.
        r_acc, formatted, metrics = score_batch(
            [r"\boxed{y}", r"\boxed{x}", r"\boxed{z}"], ["y", "hang", "w"], timeout_s=0.5, pool=hang_pool
        )
        assert r_acc.tolist() == [1.0, 0.0, 0.0]
        assert formatted.tolist() == [True, True, True]
        assert metrics["num_timeouts"] == 1
        assert hang_pool.num_timeouts == 2

        # A worker that dies mid-check scores 0 without counting as a timeout, and is replaced.
        result = score(r"\boxed{x}", "die", timeout_s=30, pool=hang_pool)
        assert not result.correct and not result.timed_out
        assert hang_pool.num_restarts == 3
        assert score(r"\boxed{x}", "x", pool=hang_pool).correct


def test_pathological_expression_times_out(pool):
    result = score(r"\boxed{10^{10^{10^{10}}}}", "5", timeout_s=0.5, pool=pool)
    assert result.timed_out and not result.correct


def test_score_batch_outputs_and_metrics(pool):
    r_acc, formatted, metrics = score_batch(
        [r"\boxed{0.5}", "no answer", "#### 7", r"\boxed{3}"], [r"\frac{1}{2}", "1", "7", "4"], pool=pool
    )
    assert r_acc.dtype.is_floating_point and r_acc.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert formatted.tolist() == [True, False, True, True]
    assert metrics == {"frac_formatted": 0.75, "frac_correct": 0.5, "num_timeouts": 0.0}


def test_score_batch_rejects_bad_input(pool):
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        score_batch(["a", "b"], ["1"], pool=pool)
    with pytest.raises(ValueError, match=r"golds\[1\] must be a non-empty string"):
        score_batch(["a", "b"], ["1", " "], pool=pool)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score("a", "1", timeout_s=0, pool=pool)


# -- real reference solutions score as correct -------------------------------------------------


def test_gsm8k_reference_solutions_are_correct(pool):
    rows = _read_jsonl("gsm8k_test.jsonl", 20)
    golds = [gold_from_gsm8k_answer(row["answer"]) for row in rows]
    r_acc, formatted, _ = score_batch([row["answer"] for row in rows], golds, pool=pool)
    assert formatted.all() and r_acc.tolist() == [1.0] * len(rows)
    # ...and a shifted gold (another problem's answer) is wrong, so the check is not vacuous.
    r_wrong, _, _ = score_batch([row["answer"] for row in rows], [str(float(g) + 1) for g in golds], pool=pool)
    assert r_wrong.sum() == 0


def test_math500_reference_solutions_are_correct(pool):
    rows = _read_jsonl("math500_test.jsonl", 30)
    r_acc, formatted, metrics = score_batch(
        [row["solution"] for row in rows], [row["answer"] for row in rows], pool=pool
    )
    assert formatted.all()
    failures = [row["answer"] for row, r in zip(rows, r_acc.tolist(), strict=True) if r != 1.0]
    assert not failures, f"reference solutions scored wrong for golds {failures}"
    assert metrics["num_timeouts"] == 0


_ORPHAN_PARENT = """
import threading, time
from agpo_megatron.data.math_reward import VerifierPool
from tests.data.test_math_reward import _misbehaving_check
if __name__ == "__main__":
    pool = VerifierPool(2, check_fn=_misbehaving_check, preload=())
    threading.Thread(target=pool.check, args=([("1", "hang"), ("2", "hang")],), kwargs=dict(timeout_s=600),
                     daemon=True).start()
    while len(pool._workers) < 2:
        time.sleep(0.05)
    time.sleep(2.0)  # both workers are now inside their (endless) check
    print(*[w.process.pid for w in pool._workers], flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    """Issue 11: after `kill -9` of the parent, its verifier workers (busy in a check) go away."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, 0)  # alive before the parent dies
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if pid_alive(p)]
        assert not alive, f"verifier workers {alive} outlived their parent"
    finally:
        parent.kill()

