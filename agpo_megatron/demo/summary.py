"""The steps task over seeds: the per-seed table, the mean, std and 95% confidence intervals of the
AGPO/GRPO token ratio and of the pass@1 difference, and issue 17's targets checked line by line.

Main numbers come from the sampled evaluation (T=1, n=4 per held-out problem; pass@1 = the mean
over samples); the greedy ratio and difference stand beside them. Intervals: Student's t over
seeds (mean +- t(0.975, n-1) x std / sqrt(n)), and a percentile bootstrap over seeds (10,000
resamples, fixed generator) in the JSON.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

# t(0.975, df) for df = 1..30: the 95% two-sided Student quantiles (any statistics table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
_T975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def stats(vals: list[float]) -> dict[str, float]:
    """Mean, sample std, min, max, and the 95% t and bootstrap intervals of the mean."""
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else float("nan")
    half = _T975[min(n - 1, len(_T975)) - 1] * std / math.sqrt(n) if n > 1 else float("nan")
    rng = random.Random(0)
    boots = sorted(sum(rng.choice(vals) for _ in range(n)) / n for _ in range(10_000))
    return {
        "mean": mean,
        "std": std,
        "min": min(vals),
        "max": max(vals),
        "ci95_t": [mean - half, mean + half],
        "ci95_bootstrap": [boots[249], boots[9749]],
        "n": n,
    }


def early_gap(run_dir: Path, a: str, b: str, steps: int = 10) -> float:
    """Mean over the first `steps` training steps of metric `a` minus metric `b`, in points, from a
    run's metrics.jsonl; NaN when not logged. Only the first steps: later, few responses carry
    waste, and a figure about them is a handful of samples."""
    from agpo_megatron.report.jsonl import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan")
    rows = [r for r in read_jsonl(path) if "step" in r and r["step"] <= steps and a in r and b in r]
    return sum(100 * (r[a] - r[b]) for r in rows) / len(rows) if rows else float("nan")


def waste_accuracy_gap(run_dir: Path, steps: int = 10) -> float:
    """Accuracy of responses with steps and no waste minus with steps and waste (steps 1-10, points).
    Positive: waste costs accuracy while sampling, so accuracy alone rewards cutting it."""
    return early_gap(run_dir, "task/acc_steps_no_waste", "task/acc_steps_waste", steps)


def waste_steps_gap(run_dir: Path, steps: int = 10) -> float:
    """Share of responses with waste among those without steps minus among those with steps (steps
    1-10, points). Positive: waste goes with skipping the steps, which costs accuracy."""
    return early_gap(run_dir, "task/waste_frac_without_steps", "task/waste_frac_with_steps", steps)


def _seed_row(r: dict[str, Any], run_dir: Path | None = None) -> dict[str, float]:
    runs = r["runs"]
    warm, grpo, agpo = runs["AGPO"]["eval_before"], runs["GRPO"]["eval_after"], runs["AGPO"]["eval_after"]
    row: dict[str, float] = {"m2_groups": r.get("frac_m2_groups") or float("nan")}
    for mode in ("sampled", "greedy"):
        for name, ev in (("warm", warm), ("grpo", grpo), ("agpo", agpo)):
            for k in ("pass@1", "mean_tokens", "reasoning_tokens", "waste_tokens", "steps_present"):
                row[f"{mode}/{name}/{k}"] = ev[f"{mode}/{k}"]
        row[f"{mode}/ratio"] = row[f"{mode}/agpo/mean_tokens"] / row[f"{mode}/grpo/mean_tokens"]
        row[f"{mode}/diff"] = 100 * (row[f"{mode}/agpo/pass@1"] - row[f"{mode}/grpo/pass@1"])
    for arm in ("grpo", "agpo"):
        row[f"{arm}/waste_acc_gap"] = waste_accuracy_gap(run_dir / arm) if run_dir else float("nan")
        row[f"{arm}/waste_steps_gap"] = waste_steps_gap(run_dir / arm) if run_dir else float("nan")
    d = r.get("design") or {}
    row["design/steps_effect"] = d.get("steps_effect", float("nan"))
    row["design/waste_effect"] = max(d.get("waste_effect", {"-": float("nan")}).values())
    return row


def _toks(x: dict[str, Any], arm: str) -> str:
    """`mean (reasoning + waste)` tokens of one arm's sampled evaluation, from a row of statistics."""
    p = f"sampled/{arm}/"
    return f"{x[p + 'mean_tokens']:.1f} ({x[p + 'reasoning_tokens']:.1f} + {x[p + 'waste_tokens']:.1f})"


HEAD = (
    "seed",
    "warm pass@1",
    "GRPO pass@1",
    "AGPO pass@1",
    "GRPO tokens (reasoning + waste)",
    "AGPO tokens (reasoning + waste)",
    "steps GRPO / AGPO",
    "AGPO/GRPO tokens",
    "pass@1 AGPO-GRPO (pts)",
    "greedy: ratio, diff",
    "m2 groups",
)


def summarize_steps(
    results: dict[int, dict[str, Any]], dirs: dict[int, Path] | None = None
) -> tuple[str, dict[str, Any]]:
    """The Markdown table (sampled evaluation; greedy beside) and the statistics over seeds.
    `dirs`: each seed's run folder, for what only the metrics hold (the waste accuracy gap)."""
    dirs = dirs or {}
    rows = {seed: _seed_row(r, dirs.get(seed)) for seed, r in sorted(results.items())}
    lines = ["| " + " | ".join(HEAD) + " |", "|---:|" + "---:|" * (len(HEAD) - 1)]

    for seed, x in rows.items():
        cells = [
            str(seed),
            f"{100 * x['sampled/warm/pass@1']:.1f}",
            f"{100 * x['sampled/grpo/pass@1']:.1f}",
            f"{100 * x['sampled/agpo/pass@1']:.1f}",
            _toks(x, "grpo"),
            _toks(x, "agpo"),
            f"{100 * x['sampled/grpo/steps_present']:.0f}% / {100 * x['sampled/agpo/steps_present']:.0f}%",
            f"{x['sampled/ratio']:.3f}",
            f"{x['sampled/diff']:+.1f}",
            f"{x['greedy/ratio']:.3f}, {x['greedy/diff']:+.1f}",
            "-" if math.isnan(x["m2_groups"]) else f"{100 * x['m2_groups']:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    st = {}
    for k in next(iter(rows.values())):
        vals = [x[k] for x in rows.values() if not math.isnan(x[k])]
        if vals:
            st[k] = stats(vals)
    r, d = st["sampled/ratio"], st["sampled/diff"]
    lines.append(
        f"| **mean** | {100 * st['sampled/warm/pass@1']['mean']:.1f} | {100 * st['sampled/grpo/pass@1']['mean']:.1f} | "
        f"{100 * st['sampled/agpo/pass@1']['mean']:.1f} | "
        f"{st['sampled/grpo/mean_tokens']['mean']:.1f} ({st['sampled/grpo/reasoning_tokens']['mean']:.1f} + "
        f"{st['sampled/grpo/waste_tokens']['mean']:.1f}) | "
        f"{st['sampled/agpo/mean_tokens']['mean']:.1f} ({st['sampled/agpo/reasoning_tokens']['mean']:.1f} + "
        f"{st['sampled/agpo/waste_tokens']['mean']:.1f}) | "
        f"{100 * st['sampled/grpo/steps_present']['mean']:.0f}% / "
        f"{100 * st['sampled/agpo/steps_present']['mean']:.0f}% | "
        f"{r['mean']:.3f} | {d['mean']:+.1f} | {st['greedy/ratio']['mean']:.3f}, {st['greedy/diff']['mean']:+.1f} | |"
    )
    g_r, g_d = st["greedy/ratio"], st["greedy/diff"]
    lines.append(f"| **std** | | | | | | | {r['std']:.3f} | {d['std']:.1f} | {g_r['std']:.3f}, {g_d['std']:.1f} | |")
    lines.append(
        f"| **95% CI (t)** | | | | | | | [{r['ci95_t'][0]:.3f}, {r['ci95_t'][1]:.3f}] | "
        f"[{d['ci95_t'][0]:+.1f}, {d['ci95_t'][1]:+.1f}] | | |"
    )
    lines.append(
        f"| **95% CI (bootstrap)** | | | | | | | [{r['ci95_bootstrap'][0]:.3f}, {r['ci95_bootstrap'][1]:.3f}] | "
        f"[{d['ci95_bootstrap'][0]:+.1f}, {d['ci95_bootstrap'][1]:+.1f}] | | |"
    )
    return "\n".join(lines), {"per_seed": rows, "stats": st}


def verdict_steps(st: dict[str, Any]) -> list[str]:
    """Issue 17's targets (sampled evaluation), each with what was measured."""
    r, d = st["sampled/ratio"], st["sampled/diff"]
    waste = st["sampled/agpo/waste_tokens"]["mean"] / max(st["sampled/grpo/waste_tokens"]["mean"], 1e-9)
    steps_gap = 100 * (st["sampled/agpo/steps_present"]["mean"] - st["sampled/grpo/steps_present"]["mean"])

    def ok(cond: bool) -> str:
        return "met" if cond else "NOT met"

    gap = st.get("grpo/waste_acc_gap")
    gap_line = (
        [
            f"- waste while sampling (GRPO's training rollouts with steps, mean over steps 1-10): accuracy without "
            f"waste minus with waste {gap['mean']:+.1f} points (seeds with the metric: {gap['n']}, min "
            f"{gap['min']:+.1f}, max {gap['max']:+.1f}); positive means accuracy alone rewards cutting waste"
        ]
        if gap
        else []
    )
    ws = st.get("grpo/waste_steps_gap")
    if ws:
        gap_line.append(
            f"- waste and skipping the steps (GRPO, steps 1-10): share of responses with waste among those "
            f"without steps minus among those with steps {ws['mean']:+.1f} points (seeds with the metric: "
            f"{ws['n']}, min {ws['min']:+.1f}, max {ws['max']:+.1f})"
        )
    return [
        f"- mean token ratio <= 0.75 with the CI's upper end < 0.90: {r['mean']:.3f}, 95% CI (t) "
        f"[{r['ci95_t'][0]:.3f}, {r['ci95_t'][1]:.3f}] ({ok(r['mean'] <= 0.75 and r['ci95_t'][1] < 0.90)})",
        f"- every seed below 1.0: max {r['max']:.3f} ({ok(r['max'] < 1.0)})",
        f"- pass@1 difference mean >= -1 point with the CI's lower end >= -3: {d['mean']:+.1f}, 95% CI (t) "
        f"[{d['ci95_t'][0]:+.1f}, {d['ci95_t'][1]:+.1f}] ({ok(d['mean'] >= -1 and d['ci95_t'][0] >= -3)})",
        f"- AGPO's waste tokens <= 0.5x GRPO's: {waste:.2f}x ({ok(waste <= 0.5)})",
        f"- step presence within 2 points of GRPO's: AGPO - GRPO = {steps_gap:+.1f} points ({ok(abs(steps_gap) <= 2)})",
        f"- design check (warm start, greedy, forced cells): steps effect {st['design/steps_effect']['mean']:+.1f} "
        f"points (min {st['design/steps_effect']['min']:+.1f}; target >= 30), largest waste effect "
        f"{st['design/waste_effect']['mean']:.1f} points (max {st['design/waste_effect']['max']:.1f})",
        *gap_line,
    ]


def mean_metric(run_dir: Path, key: str) -> float:
    """Mean over training steps of one metric of a run's metrics.jsonl; NaN when not logged."""
    from agpo_megatron.report.jsonl import read_jsonl

    path = run_dir / "metrics.jsonl"
    vals = [r[key] for r in read_jsonl(path) if "step" in r and key in r] if path.is_file() else []
    return sum(vals) / len(vals) if vals else float("nan")


PAIR_SAMPLING = ("rounds", "prompts_sampled", "frac_kept", "short_batch")
"""Dynamic sampling's per-step metrics (train/rollout_rounds.py), averaged over steps, per arm."""


def summarize_pair(
    results: dict[int, dict[str, Any]],
    a: str,
    b: str,
    dirs: dict[int, Path] | None = None,
    folders: dict[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Arm `a` against arm `b` (labels, e.g. "AGPO" and "DAPO"; both runs start from the same warm
    start of each seed): the Markdown table of the sampled evaluation (greedy beside) and the
    statistics over seeds of the token ratio a/b and the pass@1 difference a - b. `dirs` adds what
    only the metrics hold: dynamic sampling's rounds, prompts sampled per step and kept fraction;
    `folders` names each label's run folder in a seed's folder (default: the label in lower case)."""
    dirs, folders = dirs or {}, folders or {}
    rows: dict[int, dict[str, float]] = {}
    for seed, r in sorted(results.items()):
        ev = {arm: r["runs"][arm]["eval_after"] for arm in (a, b)}
        row: dict[str, float] = {}
        for mode in ("sampled", "greedy"):
            for arm in (a, b):
                for k in ("pass@1", "mean_tokens", "reasoning_tokens", "waste_tokens", "steps_present"):
                    row[f"{mode}/{arm}/{k}"] = ev[arm][f"{mode}/{k}"]
            row[f"{mode}/ratio"] = row[f"{mode}/{a}/mean_tokens"] / row[f"{mode}/{b}/mean_tokens"]
            row[f"{mode}/diff"] = 100 * (row[f"{mode}/{a}/pass@1"] - row[f"{mode}/{b}/pass@1"])
        for arm in (a, b):
            for k in PAIR_SAMPLING:
                run = dirs[seed] / folders.get(arm, arm.lower()) if seed in dirs else None
                row[f"{arm}/sampling/{k}"] = mean_metric(run, f"sampling/{k}") if run else float("nan")
        rows[seed] = row
    values = {k: [x[k] for x in rows.values() if not math.isnan(x[k])] for k in next(iter(rows.values()))}
    st = {k: stats(v) for k, v in values.items() if v}

    def rounds(x: dict[str, Any], arm: str) -> str:
        r = x[f"{arm}/sampling/rounds"]
        return "-" if math.isnan(r) else f"{r:.2f}, {x[f'{arm}/sampling/prompts_sampled']:.1f}"

    head = (
        "seed",
        f"{a} pass@1",
        f"{b} pass@1",
        f"{a} tokens (reasoning + waste)",
        f"{b} tokens (reasoning + waste)",
        f"steps {a} / {b}",
        f"{a}/{b} tokens",
        f"pass@1 {a}-{b} (pts)",
        "greedy: ratio, diff",
        f"{b} rounds, prompts per step",
    )
    lines = ["| " + " | ".join(head) + " |", "|---:|" + "---:|" * (len(head) - 1)]
    for seed, x in rows.items():
        cells = [
            str(seed),
            f"{100 * x[f'sampled/{a}/pass@1']:.1f}",
            f"{100 * x[f'sampled/{b}/pass@1']:.1f}",
            _toks(x, a),
            _toks(x, b),
            f"{100 * x[f'sampled/{a}/steps_present']:.0f}% / {100 * x[f'sampled/{b}/steps_present']:.0f}%",
            f"{x['sampled/ratio']:.3f}",
            f"{x['sampled/diff']:+.1f}",
            f"{x['greedy/ratio']:.3f}, {x['greedy/diff']:+.1f}",
            rounds(x, b),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    mean = {k: v["mean"] for k, v in st.items()}
    r, d = st["sampled/ratio"], st["sampled/diff"]
    lines.append(
        f"| **mean** | {100 * mean[f'sampled/{a}/pass@1']:.1f} | {100 * mean[f'sampled/{b}/pass@1']:.1f} | "
        f"{_toks(mean, a)} | {_toks(mean, b)} | {100 * mean[f'sampled/{a}/steps_present']:.0f}% / "
        f"{100 * mean[f'sampled/{b}/steps_present']:.0f}% | {r['mean']:.3f} | {d['mean']:+.1f} | "
        f"{mean['greedy/ratio']:.3f}, {mean['greedy/diff']:+.1f} | "
        + ("-" if f"{b}/sampling/rounds" not in mean else rounds(mean, b))
        + " |"
    )
    lines.append(f"| **std** | | | | | | {r['std']:.3f} | {d['std']:.1f} | | |")
    for name, key in (("95% CI (t)", "ci95_t"), ("95% CI (bootstrap)", "ci95_bootstrap")):
        lines.append(
            f"| **{name}** | | | | | | [{r[key][0]:.3f}, {r[key][1]:.3f}] | [{d[key][0]:+.1f}, {d[key][1]:+.1f}] | | |"
        )
    return "\n".join(lines), {"per_seed": rows, "stats": st}
