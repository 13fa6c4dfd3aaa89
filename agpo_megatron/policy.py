"""The two Megatron roles: a frozen `Reference` and a trainable `Actor`.

Small classes rather than one worker with role flags: the reference can only score, the actor can
score, take optimizer steps, and export its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import ModelArch
from agpo_megatron.parallel import Layout
from agpo_megatron.platform import cpu as cpu_platform

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


def _build(arch: ModelArch, cfg, layout: Layout):
    model = build.build_gpt(arch, cfg.model, cfg.parallel)
    if cfg.model.init_from == "hf":
        load_hf_weights(model, arch, HFCheckpointReader(cfg.model.hf_path), tp_rank=layout.tp_rank, tp=layout.tp,
                        pp_rank=layout.pp_rank, pp=layout.pp)
    return model


def _build_from(arch: ModelArch, cfg, weights: dict[str, torch.Tensor]):
    model = build.build_gpt(arch, cfg.model, cfg.parallel)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


class Reference:
    """The frozen policy the KL is measured against. No optimizer, no grads."""

    def __init__(self, arch: ModelArch, cfg, layout: Layout, init_weights: dict[str, torch.Tensor] | None = None):
        """`init_weights`: this rank's shards of the policy to freeze (normally the actor at step 0)."""
        self.model = _build(arch, cfg, layout) if init_weights is None else _build_from(arch, cfg, init_weights)
        build.freeze(self.model)

    def logprobs(self, micro_batches, *, temperature: float, with_entropy: bool = False):
        return forward.compute_logprobs([self.model], micro_batches, temperature=temperature, with_entropy=with_entropy)


class Actor:
    """The trained policy: Megatron DDP + (distributed) optimizer + LR schedule."""

    def __init__(self, arch: ModelArch, cfg, layout: Layout, total_steps: int,
                 init_weights: dict[str, torch.Tensor] | None = None):
        """`init_weights` (this rank's `named_parameters()` of another actor) replaces `cfg.model.init_from`.
        It is copied in before the optimizer exists, so its fp32 main params start from it too."""
        self.arch, self.layout = arch, layout
        self.model = _build(arch, cfg, layout) if init_weights is None else _build_from(arch, cfg, init_weights)
        self.ddp, self.optimizer, self.scheduler = build.wrap_for_training(self.model, cfg.optim, cfg.parallel, total_steps)

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return [self.ddp]

    def logprobs(self, micro_batches, *, temperature: float, with_entropy: bool = False):
        return forward.compute_logprobs(self.chunks, micro_batches, temperature=temperature, with_entropy=with_entropy)

    def train_step(self, micro_batches, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over all micro-batches; returns token-weighted metrics on every rank."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = forward.forward_backward(self.chunks, micro_batches, loss_fn, forward_only=False)
        with cpu_platform.megatron_scope():
            ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = reduce_token_weighted(per_mb, self.layout)
        metrics.update(grad_norm=float(grad_norm or 0.0), update_skipped=float(not ok),
                       lr=self.optimizer.param_groups[0]["lr"])
        return metrics

    def local_weights(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's parameter shards (e.g. to start several runs from one warm start)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def reduce_token_weighted(per_mb: list[dict[str, Any]], layout: Layout) -> dict[str, float]:
    """Average metrics over micro-batches and DP ranks, weighted by each one's `num_tokens`.

    Only the last pipeline stage has loss metrics, and TP ranks hold copies, so only
    (last stage, tp_rank 0) ranks contribute; one world all-reduce leaves the result everywhere.
    """
    keys = sorted({k for m in per_mb for k in m if k != "num_tokens"})
    names_t = [keys]
    dist.broadcast_object_list(names_t, src=dist.get_world_size() - 1)  # the last rank is a last-stage rank
    keys = names_t[0]
    vec = torch.zeros(len(keys) + 1, dtype=torch.float64)
    if layout.is_last_stage and layout.tp_rank == 0:
        for m in per_mb:
            w = float(m.get("num_tokens", 1.0))
            vec[-1] += w
            for i, k in enumerate(keys):
                vec[i] += w * float(m.get(k, 0.0))
    dist.all_reduce(vec)
    total = max(vec[-1].item(), 1.0)
    return {k: vec[i].item() / total for i, k in enumerate(keys)}
