"""Whether a run may resume from a checkpoint: the same TP/PP/EP/ETP, the same data order, and the same LR
schedule except for its length (issue 20: extending a finished run). Each refusal is one line
naming the fields, the saved values and the way on.

Extending: Megatron's OptimizerParamScheduler refuses a checkpoint whose schedule differs, its
horizon (`lr_decay_steps`) included. A longer run whose LR does not depend on the horizon
(constant after warm-up) continues as if planned that long; otherwise `optim.override_schedule`
(Megatron-LM's --override-opt_param-scheduler) continues from the saved optimizer step along the
schedule of the new length, so the LR jumps to that schedule's value at the saved step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import ConfigError, to_dict
from agpo_megatron.report.redact import redact
from agpo_megatron.runtime.parallel import Layout


def _updates_per_rollout(batch: dict[str, Any]) -> int:
    """From a saved config's batch section; configs saved before the rename have prompts_per_step (1)."""
    rollout = batch.get("prompts_per_rollout", batch.get("prompts_per_step"))
    return rollout // (batch.get("prompts_per_update") or rollout)


def horizon_matters(optim) -> bool:
    """Whether the LR after warm-up depends on the run's length (`models.build.wrap_for_training`)."""
    return optim.decay_style != "constant" and optim.min_lr != optim.lr


def lr_at(optim, total: int, n: int) -> float:
    """The LR after `n` optimizer steps of a `total`-step run: Megatron's OptimizerParamScheduler.get_lr
    for the scheduler `models.build.wrap_for_training` builds (for the one line an extension prints)."""
    decay = max(total, optim.warmup_steps + 1)
    if optim.warmup_steps and n <= optim.warmup_steps:
        return optim.lr * n / optim.warmup_steps
    if optim.decay_style == "constant":
        return optim.lr
    if n > decay:
        return optim.min_lr
    ratio = (n - optim.warmup_steps) / (decay - optim.warmup_steps)
    coeff = 1.0 - ratio if optim.decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def check_compatible(st: dict[str, Any], cfg: TrainConfig, layout: Layout, path: Path | str) -> tuple[bool, str | None]:
    """Refuse, in one line, a resume the saved state does not fit (layout, data order, LR schedule).
    Returns whether the scheduler must take this config's schedule (a longer run: `_check_schedule`),
    and a line for the user saying how the LR moves (None when nothing changes)."""
    # Expert parallelism (MoE): checkpoints from before it was recorded were saved at ep = etp = 1.
    fields = ("tp", "pp", "ep", "etp")
    was = {k: st["layout"].get(k, 1) for k in fields}
    now = {k: getattr(layout, k) for k in fields}
    if was != now:
        shown = [k for k in fields if k in ("tp", "pp") or was[k] != 1 or now[k] != 1]
        raise ConfigError(
            f"checkpoint.resume: {path} was saved at {' '.join(f'{k}={was[k]}' for k in shown)}; this run has "
            f"{' '.join(f'{k}={now[k]}' for k in shown)}. The optimizer state reshards over data-parallel ranks "
            f"only: resume at the saved {'/'.join(shown)}, or start a new run from its weights "
            f"(model.init_from=megatron, checkpoint.load_dir)"
        )
    # As run_state.json holds it (tuples become lists, secrets masked), so equal settings compare equal.
    old = json.loads(json.dumps(st["config"], default=str))
    new = json.loads(json.dumps(redact(to_dict(cfg)), default=str))
    _check_data_order(path, old, new)
    return _check_schedule(path, cfg.optim, st, old, new)


def _check_data_order(path: Path | str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """The seed, the training data and the rollout size decide which prompts come next."""
    ob, nb = old["batch"], new["batch"]
    pairs = [
        ("parallel.seed", old["parallel"]["seed"], new["parallel"]["seed"]),
        (
            "batch.prompts_per_rollout",
            ob.get("prompts_per_rollout", ob.get("prompts_per_step")),
            nb["prompts_per_rollout"],
        ),
    ]
    o_data, n_data = old["data"]["train"], new["data"]["train"]
    pairs += [(f"data.train.{k}", o_data.get(k), n_data.get(k)) for k in sorted(set(o_data) | set(n_data))]
    for field, saved, now in pairs:
        if saved != now:
            raise ConfigError(
                f"checkpoint.resume: {path} was saved with {field}={saved!r}, this run has "
                f"{field}={now!r} (it decides which prompts come next): resume with {field}={saved!r}, or "
                f"start fresh (checkpoint.resume=never and a new checkpoint.save_dir)"
            )


def _check_schedule(
    path: Path | str, optim, st: dict[str, Any], old: dict[str, Any], new: dict[str, Any]
) -> tuple[bool, str | None]:
    """The LR schedule must be the saved one, except for its length (`steps`), which may grow:
    freely where the LR does not depend on it, with `optim.override_schedule` where it does."""
    skip = {"override_schedule"}
    changed = [f"optim.{k}" for k in new["optim"] if k not in skip and old["optim"].get(k) != new["optim"][k]]
    changed += ["algo.ppo_epochs"] if old["algo"]["ppo_epochs"] != new["algo"]["ppo_epochs"] else []
    if _updates_per_rollout(old["batch"]) != _updates_per_rollout(new["batch"]):
        changed += ["batch.prompts_per_rollout / batch.prompts_per_update"]
    if changed:
        raise ConfigError(
            f"checkpoint.resume: {path} was saved with a different LR schedule "
            f"({', '.join(f'{f}' for f in changed)}); resume with the saved values (only `steps` may change)"
        )
    if old["steps"] == new["steps"]:
        return False, None
    if new["steps"] < st["step"]:
        raise ConfigError(f"steps={new['steps']} is below the saved step {st['step']} of {path}")
    per_step = _updates_per_rollout(new["batch"]) * new["algo"]["ppo_epochs"]
    o_total, n_total, done = old["steps"] * per_step, new["steps"] * per_step, st["step"] * per_step
    if horizon_matters(optim) and not optim.override_schedule:
        raise ConfigError(
            f"checkpoint.resume: {path} was saved with steps={old['steps']}, this run has "
            f"steps={new['steps']}, and optim.decay_style={optim.decay_style} makes the LR depend on the run's "
            f"length: set optim.override_schedule=true to continue with the new length from the saved step, "
            f"or resume with steps={old['steps']}"
        )
    if horizon_matters(optim):
        return True, (
            f"optim.override_schedule: the LR schedule now ends at optimizer step {n_total} (was {o_total}); at "
            f"the saved step {done} the LR moves from {lr_at(optim, o_total, done):.4g} to "
            f"{lr_at(optim, n_total, done):.4g}, and decays to {optim.min_lr:g} at step {n_total}"
        )
    return True, f"extending the run from steps={old['steps']} to steps={new['steps']} (the LR schedule is unchanged)"
