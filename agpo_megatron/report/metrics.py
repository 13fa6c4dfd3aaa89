"""Per-step metrics: a JSONL file (the source of truth), an optional wandb run, a progress bar, and
`plot`, which turns the JSONL into PNG curves. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agpo_megatron.report.redact import install_log_redaction, redact

logger = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per phase of a step: `with timer("rollout"): ...` -> {"time/rollout": s}, and this
    process's CPU time, `cpu_time/rollout`.

    NOTE: CUDA kernels run asynchronously, so without a device sync a phase would be charged for
    the kernels its predecessor queued. On a GPU every phase boundary synchronizes, and each phase
    also reports its peak allocated memory (`mem/<phase>_peak_gib`), which is what a memory plan is
    checked against. The sync costs microseconds per phase; phases are seconds long.
    """

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.times: dict[str, float] = {}
        self.current = "start-up"
        """The phase running now, or the last one finished (the hung-rank watchdog names it)."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                self.times[f"mem/{name}_peak_gib"] = max(self.times.get(f"mem/{name}_peak_gib", 0.0), peak)
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0
            # This process's CPU time (all threads): steadier than wall time on a shared CPU machine.
            self.times[f"cpu_time/{name}"] = self.times.get(f"cpu_time/{name}", 0.0) + time.process_time() - c0
            self.current = f"after {name}"

    def mark(self, name: str) -> None:
        """Name what runs now without timing it (evaluation, checkpoint save), for the watchdog."""
        self.current = name

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


def step_row(
    *,
    r_acc: torch.Tensor,
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    finish_reasons: list[str],
    times: dict[str, float],
    trained_tokens: int,
    kl_coef: float,
    eps: tuple[float, float],
    **groups: dict[str, Any],
) -> dict[str, Any]:
    """One step's metrics row. `r_acc`, `rewards`, `lengths`: [P, G]; `finish_reasons`: [P*G];
    `trained_tokens`: response tokens the update passes processed (all epochs); `groups`: named
    metric dicts, prefixed with their name (adv=..., train=... -> "adv/<key>", "train/<key>")."""
    correct = r_acc.flatten() > 0.5
    row: dict[str, Any] = {
        "reward/mean": rewards.mean().item(),
        "acc/mean": r_acc.mean().item(),
        "len/mean": lengths.mean().item(),
        "len/max": lengths.max().item(),
        # NaN, not 0, when nothing is correct: a mean over no answers is undefined.
        "len/correct_mean": lengths.flatten()[correct].mean().item() if correct.any() else float("nan"),
        "truncated_frac": sum(r == "length" for r in finish_reasons) / len(finish_reasons),
    }
    for prefix, metrics in groups.items():
        row.update({f"{prefix}/{k}": float(v) for k, v in metrics.items()})
    row.update(
        {
            "train/kl_coef": kl_coef,
            "train/eps_low": eps[0],
            "train/eps_high": eps[1],
            **times,
            "throughput/rollout_tokens_per_s": lengths.sum().item() / max(times["time/rollout"], 1e-9),
            "throughput/train_tokens_per_s": trained_tokens / max(times["time/update"], 1e-9),
        }
    )
    return row


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsLogger:
    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        config: dict[str, Any] | None = None,
        wandb_project: str | None = None,
        progress_bar: bool = True,
        filename: str = "metrics.jsonl",
        start_step: int = 1,
        step_lines: bool = False,
    ):
        """`start_step`: the first step this run logs. A fresh run (1) moves an earlier run's file
        aside; a resumed one (> 1) keeps the rows of the steps before it and drops the rest, which it
        is about to log again (they came after the checkpoint it resumes from). `step_lines`: without
        a progress bar, one short line per step on the console (`agpo train`)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._step_lines = step_lines and not progress_bar
        self.path = Path(out_dir) / filename
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            _continue_from(self.path, start_step)
        self._file = self.path.open("a")
        install_log_redaction()
        config = redact(config)  # a token passed in a config value (or a path) is never written
        if config is not None:
            (self.path.parent / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if wandb_project:
            import wandb  # optional dependency: pip install 'agpo-megatron[wandb]'; WANDB_MODE=offline works

            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(self.path.parent))
        if progress_bar and total_steps > 0:
            from tqdm import tqdm

            from agpo_megatron.report.console import console  # the terminal, also when library output goes to a file

            self._bar = tqdm(total=total_steps, desc=self.path.parent.name, dynamic_ncols=True, file=console())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = redact({"step": step, **{k: _plain(v) for k, v in metrics.items()}})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        short = {k: row[k] for k in ("reward/mean", "acc/mean", "len/mean") if isinstance(row.get(k), (int, float))}
        # One line per evaluation: its headline numbers (per-level breakdowns stay in the file).
        evals = {k[5:]: v for k, v in row.items() if k.startswith("eval/") and k.count("/") == 1}
        eval_line = f"step {step} eval: " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items() if _num(v))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k.split("/")[0]: f"{v:.3g}" for k, v in short.items()})
            if evals:
                self._bar.write(eval_line, file=self._bar.fp)
        elif self._step_lines:
            from agpo_megatron.report.console import console

            took = sum(v for k, v in row.items() if k.startswith("time/") and _num(v))
            parts = [f"{k.split('/')[0]} {v:.3g}" for k, v in short.items()]
            print(f"step {step}/{self.total_steps}  " + "  ".join(parts) + f"  ({took:.1f} s)", file=console())
            if evals:
                print(eval_line, file=console(), flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()


def _continue_from(path: Path, start_step: int) -> None:
    """Make `path` hold only rows that precede `start_step` (see `MetricsLogger`); nothing is deleted."""
    if start_step <= 1:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        aside = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        path.rename(aside)
        logger.info("%s is from an earlier run: moved to %s; this run starts a new one", path, aside.name)
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line).get("step", 0) < start_step
        except (json.JSONDecodeError, AttributeError):
            keep = False  # a line cut short when the previous run was killed
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        logger.info("%s: resuming at step %d, dropped %d rows logged after the checkpoint", path, start_step, dropped)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def plot(
    metrics_path: str | Path,
    out_png: str | Path | None = None,
    keys: tuple[str, ...] = ("reward/mean", "acc/mean", "len/mean", "len/correct_mean"),
) -> Path:
    """PNG curves of reward and response length from one metrics.jsonl (several runs: `agpo_megatron.report.plot`)."""
    from agpo_megatron.report.plot import plot_runs

    out = Path(out_png) if out_png else Path(metrics_path).with_suffix(".png")
    return plot_runs([(Path(metrics_path).parent.name, Path(metrics_path))], out, keys)
