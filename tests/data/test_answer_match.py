"""Tests for answer extraction and the math-verify accuracy reward (the pool itself: test_deadline_pool.py)."""

import itertools
import json
import threading
from pathlib import Path

import pytest

from agpo_megatron.data.answer_match import (
    extract_answer,
    extract_boxed,
    extract_gsm8k,
    gold_from_gsm8k_answer,
    score,
    score_batch,
    score_many,
    verifier_pool,
)
from agpo_megatron.data.deadline_pool import DeadlinePool
from tests.data.pool_fns import misbehaving

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def pool():
    with verifier_pool(2) as p:
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
    closed = DeadlinePool(1, fn=misbehaving)
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


@pytest.fixture(scope="module")
def hang_pool():
    with DeadlinePool(2, fn=misbehaving) as p:
        yield p


def test_hanging_crashing_and_raising_checks_score_zero(hang_pool):
    results = score_many(
        [r"\boxed{y}", r"\boxed{x}", r"\boxed{x}", r"\boxed{x}", r"\boxed{z}"],
        ["y", "hang", "die", "raise", "w"],
        timeout_s=0.5,
        pool=hang_pool,
    )
    assert [r.correct for r in results] == [True, False, False, False, False]
    assert [r.timed_out for r in results] == [False, True, False, False, False]
    assert all(r.formatted for r in results)


def test_hostile_batch_within_the_step_budget(hang_pool):
    """8 hanging checks and one per-check timeout of budget: all score 0, all are flagged, and only
    the two that were running get cut off (the rest never start; see test_deadline_pool.py)."""
    hang_pool.start()  # both workers idle and ready (the test above replaced some)
    n, restarts = 8, hang_pool.num_restarts
    r_acc, formatted, metrics = score_batch(
        [r"\boxed{x}"] * n + ["#### 3"], ["hang"] * n + ["3"], timeout_s=1.0, budget_s=1.0, pool=hang_pool
    )
    assert r_acc.tolist() == [0.0] * n + [1.0]  # the fast path is not subject to the budget
    assert formatted.all()
    assert metrics["num_timeouts"] == n
    assert hang_pool.num_restarts - restarts == 2


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
