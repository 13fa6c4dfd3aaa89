"""`agpo plot`: PNG curves from one or several runs' metrics.jsonl, overlaid in one figure.

    agpo plot runs/x/metrics.jsonl                          # one run -> runs/x/metrics.png
    agpo plot GRPO=runs/demo/grpo AGPO=runs/demo/agpo -o overlay.png
    agpo plot "GRPO=runs/seeds/seed*/grpo" "AGPO=runs/seeds/seed*/agpo" -o seeds.png

A run is `[LABEL=]PATH`: PATH is a metrics.jsonl or a run directory holding one, or a glob of
either (expanded here, so quote it). Runs that share a label are one curve: their per-step mean
(the steps where at least one run logged the key) drawn thick, each run drawn thin behind it, so
several seeds show both the average and the spread. Without a label a run is named by its
directory.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

from agpo_megatron.report.jsonl import read_jsonl

DEFAULT_KEYS = ("reward/mean", "acc/mean", "len/mean", "len/correct_mean")


def parse_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """`[LABEL=]PATH` strings -> (label, metrics.jsonl path) pairs, globs expanded in sorted order."""
    runs = []
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not label or Path(spec).exists():  # no label (or a path that contains '=')
            label, pattern = "", spec
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise ValueError(f"{spec}: the pattern matches no file")
        for p in map(Path, paths):
            metrics = p / "metrics.jsonl" if p.is_dir() else p
            if not metrics.is_file():
                raise ValueError(f"{p}: no metrics.jsonl (a run's logging.out_dir, or the file itself)")
            runs.append((label or metrics.parent.name, metrics))
    return runs


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted({s for c in curves for s in c})
    means = []
    for s in steps:
        vals = [c[s] for c in curves if s in c]
        means.append(sum(vals) / len(vals))
    return steps, means


def plot_runs(runs: list[tuple[str, Path]], out_png: str | Path, keys: tuple[str, ...] = DEFAULT_KEYS) -> Path:
    """One panel per key that any run logged; one curve per label (mean over its runs)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("agpo plot needs at least one run")
    rows = {path: read_jsonl(path) for _, path in runs}
    keys = tuple(k for k in keys if any(k in r for rs in rows.values() for r in rs))
    if not keys:
        raise ValueError(f"{', '.join(str(p) for _, p in runs)}: none of the plotted metrics {keys} is present")
    labels = list(dict.fromkeys(label for label, _ in runs))  # first-appearance order
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, label in enumerate(labels):
            curves = [
                {r["step"]: r[key] for r in rows[p] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
                for lb, p in runs
                if lb == label
            ]
            curves = [c for c in curves if c]
            if not curves:
                continue
            color = f"C{i % 10}"
            if len(curves) == 1:
                steps = sorted(curves[0])
                ax.plot(steps, [curves[0][s] for s in steps], marker=".", color=color, label=label)
                continue
            for c in curves:
                steps = sorted(c)
                ax.plot(steps, [c[s] for s in steps], color=color, alpha=0.25, linewidth=0.8)
            steps, means = _mean_curve(curves)
            ax.plot(steps, means, color=color, linewidth=2.2, label=f"{label} (mean of {len(curves)})")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(labels) > 1 or any(sum(lb == label for lb, _ in runs) > 1 for label in labels):
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def default_out(runs: list[tuple[str, Path]]) -> Path:
    """One run: next to its metrics.jsonl (metrics.png); several: overlay.png here."""
    return runs[0][1].with_suffix(".png") if len(runs) == 1 else Path("overlay.png")
