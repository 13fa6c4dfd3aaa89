"""The two Megatron roles: a frozen `Reference` and a trainable `Actor`.

Small classes rather than one worker with role flags: the reference can only score, the actor can
score, take optimizer steps, and export its weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.models import build, forward, moe
from agpo_megatron.models.hf_config import ModelArch
from agpo_megatron.models.lm_head import capture_lm_head_input
from agpo_megatron.models.routing import RoutingControl
from agpo_megatron.ops.fused_loss import fused_policy_loss_from_hidden
from agpo_megatron.runtime import cpu_platform
from agpo_megatron.runtime.nonfinite import BadStepCounter, check_finite_weights, step_is_finite
from agpo_megatron.runtime.parallel import Layout, comm_device
from agpo_megatron.train.batch import pad_multiple
from agpo_megatron.train.offload import HostStash

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


def _build(arch: ModelArch, cfg, layout: Layout):
    """A GPTModel shard with its initial weights (before any optimizer copies them)."""
    model = build.build_gpt(arch, cfg.model, cfg.parallel)
    if cfg.model.init_from == "hf":
        load_hf_weights(
            model,
            arch,
            HFCheckpointReader(cfg.model.hf_path),
            tp_rank=layout.tp_rank,
            tp=layout.tp,
            pp_rank=layout.pp_rank,
            pp=layout.pp,
            ep_rank=layout.ep_rank,
            ep=layout.ep,
            etp_rank=layout.etp_rank,
            etp=layout.etp,
        )
    elif cfg.model.init_from == "megatron":  # e.g. written by hf_to_megatron, at any TP/PP
        from agpo_megatron.checkpoint.train_state import load_checkpoint

        load_checkpoint(cfg.checkpoint.load_dir, [model], verify=cfg.checkpoint.verify)
    return model


def _build_from(arch: ModelArch, cfg, weights: dict[str, torch.Tensor]):
    model = build.build_gpt(arch, cfg.model, cfg.parallel)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


def _copy_params(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Parameter by parameter, with no intermediate copy of the whole model."""
    src = dict(source.named_parameters())
    if list(src) != [n for n, _ in model.named_parameters()]:
        raise ValueError("reference: the source model's parameters do not match (different arch or layout)")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(src[name])


class Reference:
    """The frozen policy the KL is measured against. No optimizer, no grads."""

    def __init__(self, arch: ModelArch, cfg, layout: Layout, source: torch.nn.Module | None = None):
        """`source`: this rank's shard of the policy to freeze (normally the actor's model at step 0),
        copied parameter by parameter; None = build from `cfg.model.init_from`.

        With `cfg.offload.reference` its parameters live in host memory except while it scores.
        """
        if source is None:
            self.model = _build(arch, cfg, layout)
        else:
            self.model = build.build_gpt(arch, cfg.model, cfg.parallel)
            _copy_params(self.model, source)
        self.chunk_tokens = cfg.algo.loss_chunk_tokens if cfg.algo.fused_loss else None
        build.freeze(self.model)
        # Frozen: copied to host once; leaving the device again only frees it (issue 18).
        params = self.model.parameters() if cfg.offload.reference else []
        self.memory = HostStash(params, frozen=True, what="reference param")
        self.memory.offload()

    def resident(self):
        """A context with the weights on the device: wrap a whole rollout's scoring in one
        (train/ppo.py), not each mini-batch."""
        return self.memory.resident()

    def logprobs(self, micro_batches, *, temperature: float, with_entropy: bool = False):
        with self.memory.resident():  # the outputs are new tensors: they stay when the weights leave
            return forward.compute_logprobs(
                [self.model],
                micro_batches,
                temperature=temperature,
                with_entropy=with_entropy,
                chunk_tokens=self.chunk_tokens,
            )


class Actor:
    """The trained policy: Megatron DDP + (distributed) optimizer + LR schedule."""

    def __init__(
        self,
        arch: ModelArch,
        cfg,
        layout: Layout,
        total_steps: int,
        init_weights: dict[str, torch.Tensor] | None = None,
    ):
        """`init_weights` (this rank's `named_parameters()` of another actor) replaces `cfg.model.init_from`.
        It is copied in before the optimizer exists, so its fp32 main params start from it too."""
        self.arch, self.layout = arch, layout
        self.model = _build(arch, cfg, layout) if init_weights is None else _build_from(arch, cfg, init_weights)
        # The fused loss (ops/fused_loss.py) by default; the plain reference path on request.
        self.chunk_tokens = cfg.algo.loss_chunk_tokens if cfg.algo.fused_loss else None
        self.ddp, self.optimizer, self.scheduler = build.wrap_for_training(
            self.model, cfg.optim, cfg.parallel, total_steps
        )
        self.bad_steps = BadStepCounter(cfg.algo.max_bad_steps)
        # MoE: the old-log-prob forward records each token's experts; the update replays them
        # (algo.routing_replay r2) or only counts how many it routes differently (none). r3: both
        # replay the rollout engine's record, which the micro-batches carry (train/batch.py).
        self.routing_replay = cfg.algo.routing_replay
        self.routing = None
        self._rollout_mismatch: list[float] = []  # r3: see `logprobs`
        self._rollout_mismatch_reported = False
        if arch.is_moe and not cfg.parallel.sequence_parallel and not cfg.model.recompute_activations:
            self.routing = RoutingControl.install(self.model)
            self.model.agpo_routing = self.routing

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return [self.ddp]

    @property
    def pad_multiple(self) -> int:
        """Sequence-length multiple the micro-batches need under this model's TP/SP/FP8 layout."""
        c = self.model.config
        return pad_multiple(tp=c.tensor_model_parallel_size, sequence_parallel=c.sequence_parallel, fp8=bool(c.fp8))

    def logprobs(self, micro_batches, *, temperature: float, with_entropy: bool = False):
        with self._routing("replay" if self.routing_replay == "r3" else "record"):
            out = forward.compute_logprobs(
                self.chunks,
                micro_batches,
                temperature=temperature,
                with_entropy=with_entropy,
                chunk_tokens=self.chunk_tokens,
            )
        if self.routing is not None and self.routing_replay == "r3":
            # vLLM's routing against this forward's free routing, at the weights that sampled (before
            # any update of this rollout): the engine-vs-trainer mismatch itself. Every update of the
            # rollout reports the mean over its log-prob passes (so the rollout's mean is that value).
            rollout = self.routing.pop_mismatch(count_here=self.layout.tp_rank == 0)
            if self._rollout_mismatch_reported:  # the first pass of a new rollout
                self._rollout_mismatch, self._rollout_mismatch_reported = [], False
            if rollout is not None:
                self._rollout_mismatch.append(rollout)
        return out

    def _routing(self, mode):
        return contextlib.nullcontext() if self.routing is None else self.routing.using(mode)

    def policy_step(
        self,
        micro_batches,
        loss_cfg: PolicyLossConfig,
        *,
        temperature: float,
        global_num_tokens: int,
        global_num_seqs: int,
        kl_coef: float,
        eps: tuple[float, float],
        on_policy: bool = False,
    ):
        """One PPO/GRPO optimizer step with the token-level loss of algo/loss.py.

        Micro-batches carry "old_logprobs" (and "ref_logprobs", "rollout_logprobs" when used).
        `on_policy`: these weights sampled the batch, so the old log-probs are this forward pass's
        own, detached (no "old_logprobs" needed; same gradient, one forward pass fewer).
        The counts are those of the whole mini-batch over all DP ranks, which makes the gradient
        independent of the DP/micro-batch layout. `kl_coef` and `eps` are this step's (adaptive) values.
        """
        common = dict(
            kl_coef=kl_coef,
            eps_low=eps[0],
            eps_high=eps[1],
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
        )

        def extras(mb):
            return dict(
                ref_logprobs=mb.get("ref_logprobs"),
                seq_ids=mb.get("seq_ids"),  # seq_ids: packed rows
                rollout_logprobs=mb.get("rollout_logprobs") if loss_cfg.rollout_correction != "none" else None,
            )

        def old(mb):
            return None if on_policy else mb["old_logprobs"]

        if self.chunk_tokens is None:

            def loss_fn(logits, mb):  # [B, S, V/TP]: the plain path materialises fp32 log-softmax
                lp, ent = forward.vocab_parallel_logprobs(logits, mb["targets"], temperature=temperature)
                return policy_loss(
                    lp, old(mb), mb["advantages"], mb["loss_mask"], loss_cfg, entropy=ent, **extras(mb), **common
                )

            return self.train_step(micro_batches, loss_fn)

        with capture_lm_head_input(self.model) as weight:

            def fused_loss_fn(hidden, mb):  # [B, S, H]: the logits never exist
                loss, metrics, _, _ = fused_policy_loss_from_hidden(
                    hidden,
                    weight,
                    mb["targets"],
                    old(mb),
                    mb["advantages"],
                    mb["loss_mask"],
                    loss_cfg,
                    temperature=temperature,
                    chunk_tokens=self.chunk_tokens,
                    **extras(mb),
                    **common,
                )
                return loss, metrics

            return self.train_step(micro_batches, fused_loss_fn)

    def train_step(self, micro_batches, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over all micro-batches; returns token-weighted metrics on every rank."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self._routing("compare" if self.routing_replay == "none" else "replay"):
            per_mb = forward.forward_backward(self.chunks, micro_batches, loss_fn, forward_only=False)
        metrics = reduce_token_weighted(per_mb, self.layout)
        if moe.is_moe(self.model):
            metrics["moe_aux_loss"] = moe.pop_aux_loss(self.model.config.num_layers, len(micro_batches))
        if self.routing is not None:
            # (response token, MoE layer) pairs the update routes (or would route) differently from
            # the old-log-prob forward; absent for an update that had no such forward.
            mismatch = self.routing.pop_mismatch(count_here=self.layout.tp_rank == 0)
            if mismatch is not None:
                metrics["moe_routing_mismatch"] = mismatch
            if self._rollout_mismatch:  # r3: vLLM's routing vs the trainer's, at the sampling weights
                metrics["moe_rollout_routing_mismatch"] = sum(self._rollout_mismatch) / len(self._rollout_mismatch)
                self._rollout_mismatch_reported = True
        finite = step_is_finite(self.model.parameters(), per_mb)
        # A non-finite step makes no update on any rank: no optimizer or scheduler step.
        if finite:
            with cpu_platform.megatron_scope():
                ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        else:
            ok, grad_norm = False, float("nan")
        self.bad_steps.record(finite)  # raises NonFiniteError after algo.max_bad_steps in a row
        metrics.update(
            grad_norm=float(grad_norm if grad_norm is not None else 0.0),
            update_skipped=float(not ok),
            nonfinite_step=float(not finite),
            nonfinite_steps_total=float(self.bad_steps.total),
            lr=self.optimizer.param_groups[0]["lr"],
        )
        return metrics

    def check_finite(self, where: str) -> None:
        """Collective: raise `NonFiniteError` if any rank's weights are not finite (before a sync/save)."""
        check_finite_weights(self.model.named_parameters(), where)

    def local_weights(self) -> dict[str, torch.Tensor]:
        """A copy of this rank's parameter shards (e.g. to start several runs from one warm start)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def reduce_token_weighted(per_mb: list[dict[str, Any]], layout: Layout) -> dict[str, float]:
    """Average metrics over micro-batches and DP ranks, weighted by each one's `num_tokens`; a metric
    named `*_max` takes the maximum and `*_min` the minimum instead (a token-weighted mean of
    per-micro-batch maxima would be neither the max nor a mean).

    Only the last pipeline stage has loss metrics, and TP ranks hold copies, so only
    (last stage, tp_rank 0) ranks contribute; two world all-reduces (SUM, MAX) leave the result
    everywhere.
    """
    keys = sorted({k for m in per_mb for k in m if k != "num_tokens"})
    names_t = [keys]
    dist.broadcast_object_list(names_t, src=dist.get_world_size() - 1)  # the last rank is a last-stage rank
    keys = names_t[0]
    # Extremes as one MAX reduction: a minimum is the negated maximum of the negated values.
    sign = {k: 1.0 if k.endswith("_max") else -1.0 for k in keys if k.endswith(("_max", "_min"))}
    means = [k for k in keys if k not in sign]
    vec = torch.zeros(len(means) + 1, dtype=torch.float64, device=comm_device())  # NCCL takes no CPU tensor
    ext = torch.full((max(len(sign), 1),), -math.inf, dtype=torch.float64, device=comm_device())
    if layout.is_last_stage and layout.tp_rank == 0:
        for m in per_mb:
            w = float(m.get("num_tokens", 1.0))
            vec[-1] += w
            for i, k in enumerate(means):
                vec[i] += w * float(m.get(k, 0.0))
            for i, (k, sg) in enumerate(sign.items()):
                if k in m:
                    ext[i] = max(float(ext[i]), sg * float(m[k]))
    dist.all_reduce(vec)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX)
    vals, ext_vals = vec.tolist(), ext.tolist()  # one device->host copy each, not one .item() per metric
    total = max(vals[-1], 1.0)
    out = {k: vals[i] / total for i, k in enumerate(means)}
    # No rank had the metric: NaN, not an invented extreme.
    out.update({k: sg * v if math.isfinite(v) else math.nan for (k, sg), v in zip(sign.items(), ext_vals)})
    return {k: out[k] for k in keys}
