"""No NaN or Inf ever reaches the weights, vLLM, a checkpoint or an export (issue 11).

- `step_is_finite` (collective): a training step whose loss or gradients are not finite on any
  rank makes no update on every rank. Each rank checks its own micro-batch metrics and its grad
  buffer, then one world all-reduce makes the decision identical everywhere (a rank that skipped
  alone would leave the DP replicas, and the distributed optimizer's shards, out of step).
- `BadStepCounter`: `algo.max_bad_steps` consecutive skipped steps stop the run with
  `NonFiniteError` (a persistent NaN is a diverged run, not noise).
- `check_finite_weights` (collective): called before every weight sync and every save, so a
  non-finite weight is never written anywhere, even if it got in some other way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from agpo_megatron.runtime.parallel import comm_device


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot skip past; the message says where."""


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (a world all-reduce; local without a world)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _value_finite(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return bool(torch.isfinite(v.detach()).all())
    if isinstance(v, float):
        return math.isfinite(v)
    return True


def step_is_finite(params: Iterable[torch.nn.Parameter], per_mb_metrics: list[dict[str, Any]]) -> bool:
    """Collective: are every rank's micro-batch metrics and gradients finite?

    Megatron DDP accumulates into `param.main_grad` (views of its fp32 grad buffer); plain modules
    into `.grad`. Each check is one fused reduction per tensor, memory-bound and small next to the
    backward pass it follows.
    """
    ok = all(_value_finite(v) for m in per_mb_metrics for v in m.values())
    if ok:
        for p in params:
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None and not bool(torch.isfinite(g).all()):
                ok = False
                break
    return not _any_rank(not ok)


def check_finite_weights(named_params: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Collective: raise `NonFiniteError` on every rank if any rank holds a non-finite weight."""
    bad = next((name for name, p in named_params if not bool(torch.isfinite(p.detach()).all())), None)
    if _any_rank(bad is not None):
        here = f" (first on this rank: {bad})" if bad else ""
        raise NonFiniteError(f"non-finite weights before {where}{here}; nothing was written")


class BadStepCounter:
    """Counts consecutive skipped (non-finite) steps; too many in a row stop the run."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total = 0

    def record(self, finite: bool, step_desc: str = "") -> None:
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_bad_steps:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient{step_desc} "
                f"(algo.max_bad_steps={self.max_bad_steps}): the run has diverged; lower optim.lr or check the data"
            )
