"""The steps task's design check, run on the warm start before any RL (issue 17).

Every held-out problem is answered in each of the 8 cells (steps yes/no x 0-3 waste units), the
cell forced by a prefix (`synthetic_steps.forced_prefix`): the waste, then either the first step's
left side (`7+5=`) or the box (`\\boxed{`). Greedy decoding from there, graded with the training
grader on prefix + continuation. The design holds when accuracy depends on the steps (the issue
asks for at least 30 points) and not on the waste.

With the waste after the box (`--waste-at after`) a prefix cannot force it before the answer: the
prefix fixes the steps alone, every waste level of a problem is the same generation (run once), and
the waste effect is 0 by construction; the check then measures the steps.
"""

from __future__ import annotations

import random
from typing import Any

from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.data.synthetic_steps import COMBINATIONS, WASTE_LEVELS, forced_prefix, problem_of, waste_units
from agpo_megatron.rollout.base import SamplingConfig


def design_check(session: Any, *, seed: int, waste_at: str = "before") -> dict[str, Any]:
    """Greedy accuracy per cell on the session's held-out set; collective (every rank calls it).

    Returns `cells` ({"steps=1,waste=2": accuracy}), `steps_effect` (mean accuracy with steps minus
    without, in points) and `waste_effect` (per steps setting, the largest minus the smallest
    accuracy over the waste levels, in points).
    """
    tok, examples = session.tokenizer, session.eval_examples
    prompts, golds, prefixes, cells, which = [], [], [], [], []
    index: dict[tuple[int, str], int] = {}  # (problem, prefix) -> its generation: each is run once
    for i, ex in enumerate(examples):
        problem = problem_of(ex.prompt_text)
        for steps, waste in COMBINATIONS:
            units = waste_units(problem, random.Random(f"design-{seed}-{i}-{waste}"), waste)
            prefix = forced_prefix(problem, steps=steps, waste=units, waste_at=waste_at)
            if (i, prefix) not in index:
                index[(i, prefix)] = len(prompts)
                prompts.append(ex.prompt_ids + tok.encode(prefix, add_special_tokens=False))
                golds.append(ex.gold)
                prefixes.append(prefix)
            which.append(index[(i, prefix)])
            cells.append((steps, waste))
    r = session.cfg.rollout
    sampling = SamplingConfig(
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        max_new_tokens=r.max_new_tokens,
        seed=seed,
        logprobs=False,
        stop_token_ids=session.stop_token_ids,
    )
    outs = session.rollout.generate(prompts, n=1, sampling=sampling)
    texts = [p + group[0].text for p, group in zip(prefixes, outs)]
    r_acc, _, _ = score_distributed(texts, golds, timeout_s=session.cfg.data.reward_timeout_s)
    right = r_acc.tolist()
    acc: dict[tuple[bool, int], list[float]] = {c: [] for c in COMBINATIONS}
    for cell, k in zip(cells, which, strict=True):
        acc[cell].append(right[k])
    mean = {c: 100 * sum(v) / len(v) for c, v in acc.items()}
    with_steps = sum(mean[(True, w)] for w in WASTE_LEVELS) / len(WASTE_LEVELS)
    without = sum(mean[(False, w)] for w in WASTE_LEVELS) / len(WASTE_LEVELS)
    return {
        "cells": {f"steps={int(s)},waste={w}": mean[(s, w)] for s, w in COMBINATIONS},
        "steps_effect": with_steps - without,
        "waste_effect": {
            f"steps={int(s)}": max(mean[(s, w)] for w in WASTE_LEVELS) - min(mean[(s, w)] for w in WASTE_LEVELS)
            for s in (True, False)
        },
        "num_problems": len(examples),
    }


def format_design(d: dict[str, Any]) -> str:
    """The check as a Markdown table: rows steps yes/no, columns waste units."""
    lines = [
        "| warm start, greedy, forced cell | " + " | ".join(f"waste {w}" for w in WASTE_LEVELS) + " | max - min |",
        "|---|" + "---:|" * (len(WASTE_LEVELS) + 1),
    ]
    for s, label in ((1, "steps"), (0, "no steps")):
        row = [f"{d['cells'][f'steps={s},waste={w}']:.1f}" for w in WASTE_LEVELS]
        lines.append(f"| {label} | " + " | ".join(row) + f" | {d['waste_effect'][f'steps={s}']:.1f} |")
    lines.append(f"\nSteps effect (mean over waste levels, steps minus no steps): {d['steps_effect']:+.1f} points.")
    return "\n".join(lines)
