"""Held-out evaluation: one function for the trainer's periodic evaluation, the demo's before/after
tables and `agpo eval` (`evals/cli_eval.py`).

Per run: pass@1 (the mean over `n` samples per prompt), pass@n (a prompt counts when any of its
samples is right), mean response tokens (all, correct, wrong), the truncation rate (responses that
hit the token limit) and the share of answers in the expected format; per level (Table 1 style)
when the examples carry a `level` field; and the means of a task's own per-response measures
(`analyze`, e.g. the steps task's reasoning and waste tokens).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agpo_megatron.data.datasets import Example
from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.rollout.base import RolloutEngine, SamplingConfig

Analyze = Callable[[str, int], dict[str, float]]
"""A task's per-response measures: (decoded response text, generated tokens) -> named numbers
(averaged over responses)."""


@dataclass(frozen=True)
class EvalMode:
    """One way to sample the held-out set: the demo evaluates greedy and sampled side by side."""

    name: str
    """Prefix of its keys (`greedy/pass@1`); empty for the config's one evaluation (plain keys)."""
    temperature: float
    """0 = greedy."""
    n: int
    """Samples per prompt."""


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(
    rows: list[tuple[int, float, int, bool, dict[str, float]]], n: int, level_of: list[Any] | None = None
) -> dict[str, Any]:
    """The metrics from per-sample rows (prompt index, reward, tokens, truncated, task measures).

    Pure (no engine): `evaluate` and the tests call it. `level_of[prompt]`: the prompt's level, or None.
    """
    correct = [r > 0.5 for _, r, _, _, _ in rows]
    lengths = [t for _, _, t, _, _ in rows]
    by_prompt: dict[int, bool] = defaultdict(bool)
    for (p, _, _, _, _), ok in zip(rows, correct):
        by_prompt[p] |= ok
    out: dict[str, Any] = {
        "pass@1": _mean([float(c) for c in correct]),
        f"pass@{n}": _mean([float(v) for v in by_prompt.values()]),
        "mean_tokens": _mean(lengths),
        "mean_tokens_correct": _mean([t for t, c in zip(lengths, correct) if c]),
        "mean_tokens_wrong": _mean([t for t, c in zip(lengths, correct) if not c]),
        "truncated": _mean([float(tr) for _, _, _, tr, _ in rows]),
        "num_prompts": len(by_prompt),
        "n": n,
    }
    keys = sorted({k for *_, m in rows for k in m})
    for k in keys:
        out[k] = _mean([m[k] for *_, m in rows if k in m])
    if level_of is not None:
        by_level: dict[Any, list[int]] = defaultdict(list)
        for i, (p, *_) in enumerate(rows):
            if level_of[p] is not None:
                by_level[level_of[p]].append(i)
        for level, idx in sorted(by_level.items(), key=lambda kv: str(kv[0])):
            out[f"level{level}/pass@1"] = _mean([float(correct[i]) for i in idx])
            out[f"level{level}/mean_tokens"] = _mean([lengths[i] for i in idx])
            out[f"level{level}/num_prompts"] = len({rows[i][0] for i in idx})
    return out


def evaluate(
    engine: RolloutEngine,
    examples: list[Example],
    sampling: SamplingConfig,
    *,
    n: int = 1,
    timeout_s: float = 5.0,
    budget_s: float | None = None,
    analyze: Analyze | None = None,
    level_field: str = "level",
    responses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Generate `n` samples per example, grade them with the training grader, and `summarize`.

    `responses`: a list to append every sample to (prompt index, text, tokens, reward, finish reason).

    Collective when a process group exists (every rank calls it with the same examples): the ranks
    split the answer checks and all report the same numbers.
    """
    if not examples:
        return {}
    groups = engine.generate([ex.prompt_ids for ex in examples], n=n, sampling=sampling)
    flat = [(p, ex, c) for p, (ex, group) in enumerate(zip(examples, groups)) for c in group]
    r_acc, formatted, _ = score_distributed(
        [c.text for _, _, c in flat], [ex.gold for _, ex, _ in flat], timeout_s=timeout_s, budget_s=budget_s
    )
    rows = [
        (p, r, len(c.token_ids), c.finish_reason == "length", analyze(c.text, len(c.token_ids)) if analyze else {})
        for (p, _, c), r in zip(flat, r_acc.tolist())
    ]
    if responses is not None:
        responses += [
            {"prompt": p, "text": c.text, "tokens": len(c.token_ids), "reward": r, "finish": c.finish_reason}
            for (p, _, c), r in zip(flat, r_acc.tolist())
        ]
    levels = [ex.metadata.get(level_field) for ex in examples]
    out = summarize(rows, n, levels if any(lv is not None for lv in levels) else None)
    out["formatted"] = formatted.float().mean().item()
    return out


def evaluate_modes(
    engine: RolloutEngine,
    examples: list[Example],
    modes: Sequence[EvalMode],
    base: SamplingConfig,
    **kw: Any,
) -> dict[str, Any]:
    """`evaluate` once per mode, keys prefixed with the mode's name (none for an unnamed mode)."""
    out: dict[str, Any] = {}
    for mode in modes:
        sampling = SamplingConfig(
            temperature=mode.temperature,
            top_p=base.top_p,
            top_k=base.top_k,
            max_new_tokens=base.max_new_tokens,
            seed=base.seed,
            logprobs=False,
            stop_token_ids=base.stop_token_ids,
        )
        res = evaluate(engine, examples, sampling, n=mode.n, **kw)
        out.update({(f"{mode.name}/{k}" if mode.name else k): v for k, v in res.items()})
    return out


def format_table(rows: dict[str, dict[str, Any]], prefix: str = "") -> str:
    """A small Markdown table: one row per label, columns pass@1 / mean tokens / mean tokens correct
    (`prefix`: the mode's keys, e.g. `sampled/`); the task's reasoning and waste tokens when present."""
    extra = [
        k for k in ("reasoning_tokens", "waste_tokens", "steps_present") if any(prefix + k in r for r in rows.values())
    ]
    head = ["run", "pass@1", "mean tokens", "mean tokens (correct)", *[k.replace("_", " ") for k in extra]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(v: Any, scale: float = 1.0) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:.1f}"

    for label, r in rows.items():
        vals = [
            cell(r.get(prefix + "pass@1"), 100),
            cell(r.get(prefix + "mean_tokens")),
            cell(r.get(prefix + "mean_tokens_correct")),
        ]
        vals += [cell(r.get(prefix + k), 100 if k == "steps_present" else 1) for k in extra]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
