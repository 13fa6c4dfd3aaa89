"""The steps task (issue 17): solutions hold reasoning that helps and waste that cannot change correctness.

    question:  7+5-3+4=
    solution:  [waste] [steps] \\boxed{13}                 (waste_at="before", the default)
    e.g.       hmm let me think 7+5-3+4= 7+5=12 12-3=9 9+4=13 \\boxed{13}
    or:        [steps] \\boxed{13} [waste]                 (waste_at="after")

* **Steps** (reasoning that helps): one equation per operation, left to right. Without them the
  tiny model must produce the sum of 3 or 4 numbers in one go, which it mostly cannot.
* **Waste** (copied, never computed): 0-3 units before the steps, each a filler phrase
  (`ok let me see`, `hmm let me think`, `well now`) or the question restated verbatim. No waste
  token carries a result, so waste cannot make an answer right or wrong.
* `waste_at="after"` puts the same waste after the box instead: the answer is written before any
  waste token, so waste is inert by construction, also while sampling (where waste before the steps
  was measured to go with skipping them: docs/demo.md).

The warm start (`make_split`'s training rows) sees all 8 combinations (steps yes/no x 0-3 waste
units) in exactly equal shares, so the warm policy writes every combination and RL can move
either. The held-out rows share no question with the training rows (`make_split`).

`analyze` splits any response into reasoning tokens, waste tokens and the rest (the box, EOS,
anything unparsable) and says whether steps are present; the trainer logs it per step
(`task/...` in metrics.jsonl) and the evaluation per run. Token counts use the task tokenizer's
own pieces (`synthetic.count_tokens`), so they add up to the response's length.
"""

from __future__ import annotations

import random
import re
from typing import Any

from agpo_megatron.data.synthetic import Problem, count_tokens, make_problem

__all__ = [
    "COMBINATIONS",
    "OPERANDS",
    "WASTE_LEVELS",
    "WASTE_POSITIONS",
    "analyze",
    "forced_prefix",
    "make_solution",
    "make_split",
    "problem_of",
    "waste_units",
]

WASTE_LEVELS = (0, 1, 2, 3)
"""Waste units a training solution carries."""
COMBINATIONS = tuple((steps, waste) for steps in (True, False) for waste in WASTE_LEVELS)
"""(steps present, waste units): the 8 cells the warm start sees in equal shares."""
WASTE_POSITIONS = ("before", "after")
"""Where a solution's waste goes: before the steps, or after the box."""
_PHRASES = ("ok let me see", "hmm let me think", "well now")
_RESTATE = "restate"
OPERANDS = (3, 4)
"""Operands per problem (3 or 4; `make_split(operands=...)`)."""

_EQUATION = re.compile(r"\d+[+-]\d+=\d+")
"""A step: computed (it carries a result)."""
_RESTATED = re.compile(r"\d+(?:[+-]\d+){2,}=")
"""A restated question (3+ operands): copied, no result after `=`; an unfinished step (`7+5=`) is not."""
_FILLER = frozenset(w for phrase in _PHRASES for w in phrase.split())


def waste_units(problem: Problem, rng: random.Random, n: int) -> list[str]:
    """`n` waste units: filler phrases or the question restated, drawn at random."""
    return [problem.question if (u := rng.choice((*_PHRASES, _RESTATE))) == _RESTATE else u for _ in range(n)]


def make_solution(problem: Problem, *, steps: bool, waste: list[str], waste_at: str = "before") -> str:
    """`[waste] [steps] \\boxed{answer}` (or `[steps] \\boxed{answer} [waste]` with waste_at="after"),
    single spaces between the parts."""
    answer = [*(problem.steps() if steps else []), f"\\boxed{{{problem.answer}}}"]
    return " ".join([*answer, *waste] if waste_at == "after" else [*waste, *answer])


def forced_prefix(problem: Problem, *, steps: bool, waste: list[str], waste_at: str = "before") -> str:
    """The start of a solution that fixes its cell for the design check: the waste, then either the
    first step's left side (`7+5=`: the model computes from there on) or the box (`\\boxed{`: the
    model must answer without steps). With waste_at="after" the waste cannot be forced before the
    answer: the prefix fixes the steps alone."""
    first = problem.steps()[0]
    head = first[: first.index("=") + 1] if steps else "\\boxed{"
    return " ".join([*waste, head] if waste_at == "before" else [head])


def _problems(rng: random.Random, n: int, exclude: set[str], operands: tuple[int, ...]) -> list[Problem]:
    out = []
    while len(out) < n:
        p = make_problem(rng, rng.choice(operands) - 2)
        if p.question not in exclude:
            out.append(p)
    return out


def _held_out(seed: int, n: int, operands: tuple[int, ...]) -> list[Problem]:
    """The first `n` distinct questions of the held-out stream of `seed` (a prefix is a subset)."""
    rng, seen, out = random.Random(f"steps-held-out-{seed}"), set(), []
    while len(out) < n:
        p = make_problem(rng, rng.choice(operands) - 2)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _row(problem: Problem, rng: random.Random, steps: bool, waste: int, waste_at: str) -> dict[str, Any]:
    units = waste_units(problem, rng, waste)
    return {
        "question": problem.question,
        "answer": str(problem.answer),
        "solution": make_solution(problem, steps=steps, waste=units, waste_at=waste_at),
        "steps": steps,
        "waste": waste,
        "waste_text": units,
        "level": len(problem.operands) - 1,  # 3 operands: level 2, 4: level 3 (as synthetic:arith's levels)
    }


def make_split(
    n_train: int,
    n_eval: int,
    seed: int,
    *,
    n_held_out: int | None = None,
    operands: tuple[int, ...] = OPERANDS,
    waste_at: str = "before",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and held-out rows, deterministic in `seed`; no question is in both.

    The held-out rows are the first `n_eval` distinct questions of the seed's held-out stream;
    training excludes the first `n_held_out` (default `n_eval`) of them, so any held-out set of
    up to `n_held_out` rows at this seed is disjoint from training. Training rows cycle through
    `COMBINATIONS` in a shuffled order (equal shares when `n_train` is a multiple of 8); held-out
    rows carry a combination too (used by the design check), drawn the same way.
    """
    n_held_out = n_eval if n_held_out is None else n_held_out
    if n_eval > n_held_out:
        raise ValueError(f"n_eval ({n_eval}) must be <= n_held_out ({n_held_out})")
    if not operands or any(not 3 <= k <= 4 for k in operands):
        raise ValueError(f"operands must be 3 or 4 (a restated 2-operand question reads as a step), got {operands}")
    if waste_at not in WASTE_POSITIONS:
        raise ValueError(f"waste_at must be one of {WASTE_POSITIONS}, got {waste_at!r}")
    held = _held_out(seed, n_held_out, operands)
    rng = random.Random(f"steps-train-{seed}")
    train_problems = _problems(rng, n_train, {p.question for p in held}, operands)
    rows = []
    for problems in (train_problems, held[:n_eval]):
        cells = [COMBINATIONS[i % len(COMBINATIONS)] for i in range(len(problems))]
        rng.shuffle(cells)
        rows.append([_row(p, rng, s, w, waste_at) for p, (s, w) in zip(problems, cells, strict=True)])
    return rows[0], rows[1]


def problem_of(question: str) -> Problem:
    """The `Problem` of a question string (`7+5-3=`)."""
    return Problem(tuple(int(x) for x in re.findall(r"\d+", question)), tuple(re.findall(r"[+-]", question)))


def analyze(text: str, num_tokens: int | None = None) -> dict[str, float]:
    """Split a response (decoded text, EOS excluded) into reasoning, waste and other tokens.

    A whitespace-separated chunk is reasoning when it is an equation with a result (`12-3=9`),
    waste when it is a filler word or a restated expression without a result (`7+5-3=`), and
    other otherwise (the box, or anything the model made up). A chunk's trailing whitespace counts
    with it. `steps_present`: 1.0 when the response holds at least one equation.

    `num_tokens`: the response's generated length (EOS included); then other = the rest, so the
    three add up to it exactly. Re-tokenizing decoded text can differ from what was generated
    (a word token glued to letters, `xme`, re-reads as letters), but never inside an equation or a
    filler word written as such.
    """
    out = {"reasoning_tokens": 0.0, "waste_tokens": 0.0, "other_tokens": 0.0, "steps_present": 0.0}
    lead = len(text) - len(text.lstrip())
    out["other_tokens"] += count_tokens(text[:lead])
    for m in re.finditer(r"(\S+)(\s*)", text):
        chunk, n = m.group(1), count_tokens(m.group(0))
        if _EQUATION.fullmatch(chunk):
            out["reasoning_tokens"] += n
            out["steps_present"] = 1.0
        elif chunk in _FILLER or _RESTATED.fullmatch(chunk):
            out["waste_tokens"] += n
        else:
            out["other_tokens"] += n
    if num_tokens is not None:
        out["other_tokens"] = num_tokens - out["reasoning_tokens"] - out["waste_tokens"]
    return out
