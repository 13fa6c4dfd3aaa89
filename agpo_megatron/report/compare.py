"""`agpo compare RUN_DIR...`: one Markdown table across runs and one PNG overlaying their curves.

Per run (a `logging.out_dir`): final eval pass@1 and mean response tokens, overall and per level
(from `results.json`, which `agpo train` writes at the end, else from the last `eval/*` row of
metrics.jsonl), the mean over steps of the KL to the reference (`train/kl_ref`, only when the run
has a reference) and to the rollout policy (`train/approx_kl`), the mean entropy, the prompts sampled
per step (`sampling/prompts_sampled`: what DAPO's dynamic sampling pays in generation), and the wall time
(`results.json`'s `wall_time_s`; a run without it, e.g. still running, shows "-").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from agpo_megatron.report.jsonl import read_jsonl

CURVES = (
    "reward/mean",
    "acc/mean",
    "len/mean",
    "train/entropy",
    "train/kl_ref",
    "train/approx_kl",
    "sampling/frac_kept",
)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Metrics rows and the final eval of one run directory."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a run's logging.out_dir?)")
    rows = read_jsonl(metrics)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    final = results.get("eval_after")
    if final is None:  # no results.json (run cut short): the last periodic eval, if any
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        final = {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    return {"dir": run_dir, "rows": rows, "final": final, "wall_time_s": results.get("wall_time_s")}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def table(runs: list[dict[str, Any]]) -> str:
    """The Markdown table, one row per run (levels: the union over runs, sorted)."""
    levels = sorted(
        {m.group(1) for r in runs for k in r["final"] if (m := re.fullmatch(r"level(.+)/mean_tokens", k))},
        key=lambda s: (len(s), s),
    )
    head = [
        "run",
        "steps",
        "pass@1 (%)",
        "mean tokens",
        *[f"tokens L{lv}" for lv in levels],
        "KL(ref)",
        "KL(old)",
        "entropy",
        "prompts/step",
        "wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, r in zip(_labels([r["dir"] for r in runs]), runs):
        f, rows = r["final"], r["rows"]
        pass1 = f.get("pass@1")
        cells = [
            label,
            str(max((row["step"] for row in rows), default=0)),
            _fmt(None if pass1 is None else 100 * pass1, ".1f"),
            _fmt(f.get("mean_tokens"), ".1f"),
            *[_fmt(f.get(f"level{lv}/mean_tokens"), ".1f") for lv in levels],
            _fmt(_mean(rows, "train/kl_ref")),
            _fmt(_mean(rows, "train/approx_kl")),
            _fmt(_mean(rows, "train/entropy")),
            _fmt(_mean(rows, "sampling/prompts_sampled"), ".1f"),
            _fmt(r["wall_time_s"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out_png: str | Path) -> Path:
    """One panel per metric in CURVES that any run logged; one line per run (`plot.plot_runs`)."""
    from agpo_megatron.report.plot import plot_runs

    labels = _labels([r["dir"] for r in runs])  # unique: runs that share a name are told apart by path
    return plot_runs([(lb, Path(r["dir"]) / "metrics.jsonl") for lb, r in zip(labels, runs)], out_png, keys=CURVES)


def compare(run_dirs: list[str | Path], out_prefix: str | Path = "compare") -> tuple[str, Path, Path]:
    """Writes `<out_prefix>.md` and `<out_prefix>.png`; returns (table, md path, png path)."""
    if not run_dirs:
        raise ValueError("agpo compare needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    md = table(runs)
    out_md = Path(f"{out_prefix}.md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md + "\n")
    return md, out_md, plot(runs, f"{out_prefix}.png")
