"""Held-out evaluation: pass@1 accuracy and response length, overall and per MATH level (Table 1 style)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from agpo_megatron.data.datasets import Example
from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.rollout.base import RolloutEngine, SamplingConfig


def evaluate(
    engine: RolloutEngine,
    examples: list[Example],
    sampling: SamplingConfig,
    *,
    n: int = 1,
    timeout_s: float = 5.0,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """pass@1 (mean over `n` samples per prompt) and mean response tokens (all, and correct only).

    Collective when a process group exists (every rank calls it with the same examples): the ranks
    split the answer checks and all report the same numbers.
    """
    if not examples:
        return {}
    groups = engine.generate([ex.prompt_ids for ex in examples], n=n, sampling=sampling)
    flat = [(ex, c) for ex, group in zip(examples, groups) for c in group]
    r_acc, formatted, _ = score_distributed(
        [c.text for _, c in flat], [ex.gold for ex, _ in flat], timeout_s=timeout_s, budget_s=budget_s
    )
    lengths = [len(c.token_ids) for _, c in flat]
    correct_lens = [n_tok for n_tok, r in zip(lengths, r_acc.tolist()) if r > 0.5]
    out: dict[str, Any] = {
        "pass@1": r_acc.mean().item(),
        "mean_tokens": sum(lengths) / len(lengths),
        "mean_tokens_correct": sum(correct_lens) / len(correct_lens) if correct_lens else float("nan"),
        "formatted": formatted.float().mean().item(),
        "num_prompts": len(examples),
    }
    by_level: dict[Any, list[tuple[float, int]]] = defaultdict(list)
    for (ex, _), r, n_tok in zip(flat, r_acc.tolist(), lengths):
        if "level" in ex.metadata:
            by_level[ex.metadata["level"]].append((r, n_tok))
    for level, rows in sorted(by_level.items()):
        out[f"level{level}/pass@1"] = sum(r for r, _ in rows) / len(rows)
        out[f"level{level}/mean_tokens"] = sum(t for _, t in rows) / len(rows)
    return out


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A small Markdown table: one row per label, columns pass@1 / mean tokens / mean tokens correct."""
    lines = ["| run | pass@1 | mean tokens | mean tokens (correct) |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {100 * r['pass@1']:.1f} | {r['mean_tokens']:.1f} | {r['mean_tokens_correct']:.1f} |")
    return "\n".join(lines)
