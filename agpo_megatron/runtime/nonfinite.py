"""No NaN or Inf ever reaches the weights, vLLM, a checkpoint or an export (issue 11).

- `step_is_finite` (collective): a training step whose loss or gradients are not finite on any
  rank makes no update on every rank. Each rank checks its own micro-batch metrics and its grad
  buffer, then one world all-reduce makes the decision identical everywhere (a rank that skipped
  alone would leave the DP replicas, and the distributed optimizer's shards, out of step).
- `BadStepCounter`: `algo.max_bad_steps` consecutive skipped steps stop the run with
  `NonFiniteError` (a persistent NaN is a diverged run, not noise).
- `check_finite_weights` (collective): called before every weight sync and every save, so a
  non-finite weight is never written anywhere, even if it got in some other way.

Each check makes one device->host sync, not one per tensor (issue 18).
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


def host_bool(flag: torch.Tensor) -> bool:
    """The one device->host sync of a check (a 0-dim tensor to a Python bool)."""
    return bool(flag.item())


def _max_abs(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each non-empty tensor's max |x| as a 0-dim fp32 tensor on its device: NaN or Inf if any element
    is. A reduction kernel per tensor, no sync, no temporary the size of the tensor (as isfinite has)."""
    # integer and bool tensors (counts in the metrics) are finite by construction
    return [
        torch.linalg.vector_norm(t.detach(), float("inf")).float()
        for t in tensors
        if t.numel() and t.is_floating_point()
    ]


def _all_finite(maxima: list[torch.Tensor], device: torch.device) -> torch.Tensor:  # 0-dim bool
    if not maxima:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack([m.to(device) for m in maxima])).all()


def _all_ranks_finite(ok: torch.Tensor) -> bool:
    """True on every rank if `ok` (a 0-dim bool on any device) holds on every rank: one world
    all-reduce without a world of one, then the check's single device->host sync."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        bad = (~ok).to(device=comm_device(), dtype=torch.float32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        ok = bad[0] == 0
    return host_bool(ok)


def step_is_finite(params: Iterable[torch.nn.Parameter], per_mb_metrics: list[dict[str, Any]]) -> bool:
    """Collective: are every rank's micro-batch metrics and gradients finite?

    Megatron DDP accumulates into `param.main_grad` (views of its fp32 grad buffer); plain modules
    into `.grad`. Every tensor is reduced on the device and the per-tensor results stacked, so the
    check costs one device->host sync however many parameters there are (issue 18: it was one per
    parameter, several hundred per step).
    """
    ok = all(math.isfinite(v) for m in per_mb_metrics for v in m.values() if isinstance(v, float))
    grads = [g for p in params if (g := _grad(p)) is not None]
    metrics = [v for m in per_mb_metrics for v in m.values() if isinstance(v, torch.Tensor)]
    tensors = grads + metrics
    device = grads[0].device if grads else comm_device() if dist.is_initialized() else torch.device("cpu")
    flag = _all_finite(_max_abs(tensors), device) & ok
    return _all_ranks_finite(flag)


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


def check_finite_weights(named_params: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Collective: raise `NonFiniteError` on every rank if any rank holds a non-finite weight.
    One device->host sync when all are finite; naming the culprit costs one more."""
    named = [(n, p) for n, p in named_params if p.numel() and p.is_floating_point()]  # aligned with _max_abs
    maxima = _max_abs(p for _, p in named)
    device = named[0][1].device if named else torch.device("cpu")
    if _all_ranks_finite(_all_finite(maxima, device)):
        return
    stacked = torch.isfinite(torch.stack([m.to(device) for m in maxima])) if maxima else None
    bad = None
    if stacked is not None and not host_bool(stacked.all()):
        bad = named[int(torch.nonzero(~stacked)[0, 0])][0]
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
