"""Accuracy reward for math answers: extract the final answer, then check it against the gold.

A response is scored in three steps:

1. **Extract** the final answer (`extract_answer`): the content of the last `\\boxed{...}`
   (or `\\fbox{...}`), else the number after the last `#### ` (GSM8K style). A response
   with neither is *unformatted* and scores 0.
2. **Fast path**, in this process: if the extracted answer and the gold are the same string
   (up to whitespace), or are both plain decimal numbers, the check is decided here without
   any worker round trip. That decides most GSM8K checks and many MATH ones.
3. **Symbolic check** with `math-verify` (`parse` + `verify`, gold and answer both wrapped
   in `\\boxed{}` so plain numbers and LaTeX parse alike) in a
   `agpo_megatron.data.deadline_pool.DeadlinePool` worker process, under a hard
   per-check deadline and an optional budget for the whole batch.

Why worker processes: sympy can take unbounded time on adversarial expressions (a model will
eventually emit `10^{10^{10}}`), and math-verify's own timeout relies on `signal.alarm`,
which only works in the main thread of the main interpreter, while the trainer may score from
any thread. A check that misses its deadline (or is cut off, or never started, when the batch's
budget runs out) scores 0 and is counted in `num_timeouts`.

This module deliberately does not import torch at module level: workers import it (to find
the check function), and keeping torch out keeps worker start-up around a second and their
memory small. Scoring the same batch identically on every rank is reward_dist.py's job.
"""

import atexit
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

from agpo_megatron.data.deadline_pool import DeadlinePool, Status, default_num_workers

if TYPE_CHECKING:
    import torch

__all__ = [
    "RewardResult",
    "extract_answer",
    "extract_boxed",
    "extract_gsm8k",
    "get_default_pool",
    "gold_from_gsm8k_answer",
    "math_verify_equal",
    "reward_metrics",
    "score",
    "score_batch",
    "score_many",
    "verifier_pool",
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
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, stripped.

    Braces are matched with a depth counter, so nested groups such as `\\boxed{\\frac{1}{2}}`
    come back whole (`\\frac{1}{2}`). A backslash escapes the next character, so `\\{` and
    `\\}` (literal braces, e.g. in `\\boxed{\\{1, 2\\}}`) do not change the depth.

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
    """The number after the last `####` in `text` (GSM8K's answer marker), or None.

    `$` signs, thousands commas and a trailing period are dropped: `#### $1,234.` gives
    `1234`. Only the last marker counts; if no number follows it, the result is None.
    """
    pos = text.rfind("####")
    if pos < 0:
        return None
    match = _GSM8K_NUMBER_RE.match(text, pos + len("####"))
    if match is None:
        return None
    return match.group(1).replace(",", "")


def extract_answer(text: str) -> str | None:
    """The final answer of a response: `extract_boxed` first, then `extract_gsm8k`.

    Boxed wins because that is the format the prompt template asks for; `####` is kept as a
    fallback so that GSM8K-style reference solutions (and models fine-tuned on them) are still
    readable. None means the response is unformatted.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return extract_gsm8k(text)


def gold_from_gsm8k_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K row: the number after `#### ` in its `answer` field."""
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
    """Decide `extracted == gold` without sympy when that is safe; None means "ask a worker"."""
    if "".join(extracted.split()) == "".join(gold.split()):
        return True
    a, b = _as_plain_number(extracted), _as_plain_number(gold)
    if a is not None and b is not None:
        return a == b
    return None


def math_verify_equal(extracted: str, gold: str) -> bool:
    """Whether `extracted` is mathematically equivalent to `gold` according to math-verify.

    Both strings are wrapped in `\\boxed{}` before `math_verify.parse`: that makes plain
    numbers (`14/3`), bare LaTeX (`\\frac{14}{3}`) and assignments (`x = 3`, which verify
    reduces to its right-hand side) all parse. math-verify's own signal-based timeouts are
    disabled: this runs inside a `verifier_pool` worker, whose deadline is enforced by
    killing the process.
    """
    from math_verify import parse, verify

    # math-verify warns once per process that its own timeouts are off, which is intended here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    answer_parsed = parse(f"\\boxed{{{extracted}}}", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def verifier_pool(num_workers: int, **kw) -> DeadlinePool:
    """A pool of math-verify workers (`math_verify` imported before the first check). `kw`: DeadlinePool's."""
    kw = {"fn": math_verify_equal, "preload": ("math_verify",), "name": "agpo-verifier", **kw}
    return DeadlinePool(num_workers, **kw)


_default_pool: DeadlinePool | None = None
_default_pool_lock = threading.Lock()


def get_default_pool(num_workers: int | None = None) -> DeadlinePool:
    """The process-wide pool used when `score`/`score_many`/`score_batch` get no `pool`.

    Built lazily (no processes exist until a check needs one) with `num_workers` workers,
    `agpo_megatron.data.deadline_pool.default_num_workers` if None. An existing pool is
    reused when `num_workers` is None or matches, and rebuilt when a different size is asked
    for or after a `fork`.
    """
    global _default_pool
    with _default_pool_lock:
        pool = _default_pool
        if pool is not None and pool.usable:
            if num_workers is None or num_workers == pool.num_workers:
                return pool
            pool.close()
        _default_pool = verifier_pool(default_num_workers() if num_workers is None else num_workers)
        return _default_pool


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
    """Whether a final answer could be extracted (boxed or `####`)."""
    extracted: str | None
    """The extracted final answer; None when unformatted."""
    timed_out: bool = False
    """Whether the equivalence check missed its deadline or the batch's budget (then `correct` is False)."""


def score_many(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
    budget_s: float | None = None,
    pool: DeadlinePool | None = None,
    num_workers: int | None = None,
) -> list[RewardResult]:
    """Score each response against its gold; the checks the fast path leaves open run in parallel.

    `timeout_s` bounds each symbolic check, `budget_s` (None: unbounded) all of them together:
    checks still running or not yet started when it runs out score 0 as timed out. `pool`
    defaults to `get_default_pool` (sized by `num_workers`); it is only touched when the
    fast path cannot decide.
    """
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
        outcomes = pool.run([(extracted, golds[i]) for i, extracted in slow], timeout_s=timeout_s, budget_s=budget_s)
        for (i, extracted), outcome in zip(slow, outcomes, strict=True):
            # A check that raised (math-verify on an unparsable answer) is an answer we could not verify.
            results[i] = RewardResult(
                correct=outcome.status is Status.DONE and outcome.value is True,
                formatted=True,
                extracted=extracted,
                timed_out=outcome.missed_deadline,
            )
    return results  # type: ignore[return-value]  # every slot filled above


def score(response_text: str, gold: str, *, timeout_s: float = 5.0, pool: DeadlinePool | None = None) -> RewardResult:
    """Score one response against its gold answer (see the module docstring for the steps)."""
    return score_many([response_text], [gold], timeout_s=timeout_s, pool=pool)[0]


def reward_metrics(correct: Sequence[bool], formatted: Sequence[bool], timed_out: Sequence[bool]) -> dict[str, float]:
    """`frac_formatted`, `frac_correct` and `num_timeouts` (checks that missed a deadline or the budget)."""
    n = max(len(correct), 1)
    return {
        "frac_formatted": sum(map(bool, formatted)) / n,
        "frac_correct": sum(map(bool, correct)) / n,
        "num_timeouts": float(sum(map(bool, timed_out))),
    }


def score_batch(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float = 5.0,
    budget_s: float | None = None,
    num_workers: int | None = None,
    pool: DeadlinePool | None = None,
) -> tuple["torch.Tensor", "torch.Tensor", dict[str, float]]:
    """`score_many` as tensors, in this process alone (reward_dist.score_distributed shares the work).

    Returns `r_acc` (float32 `[N]`: 1.0 for a correct answer, else 0.0), `formatted` (bool `[N]`:
    whether an answer could be extracted) and the batch's `reward_metrics`.
    """
    import torch

    results = score_many(responses, golds, timeout_s=timeout_s, budget_s=budget_s, pool=pool, num_workers=num_workers)
    r_acc = torch.tensor([float(r.correct) for r in results], dtype=torch.float32)
    formatted = torch.tensor([r.formatted for r in results], dtype=torch.bool)
    metrics = reward_metrics(
        [r.correct for r in results], [r.formatted for r in results], [r.timed_out for r in results]
    )
    return r_acc, formatted, metrics
