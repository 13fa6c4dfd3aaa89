"""`rollout.*`: the vLLM engine, its sampling, and where it runs (colocated with the trainer, or on
ranks of its own with bounded staleness; issue 21). Re-exported by `config/schema.py`, which builds
`TrainConfig` from it and checks what needs the world size (`TrainConfig.check_world`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from agpo_megatron.config.validate import require as _require


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    tp: int = 1
    """vLLM tensor-parallel size (its own groups inside the same torchrun world)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scales logits by the same value before log-probs."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    max_new_tokens: int = 1024
    """Longest response."""
    logprob_mode: Literal["recompute", "rollout"] = "recompute"
    """Old log-probs: 'recompute' with the Megatron actor (exact for the loss), or take vLLM's
    processed sampling log-probs ('rollout', one forward cheaper)."""
    gpu_memory_utilization: float = 0.5
    """vLLM's share of GPU memory (GPU only)."""
    kv_cache_memory_bytes: int | None = None
    """Explicit KV-cache size; on CPU keep it small (256 MiB) or vLLM takes 5 GiB."""
    enable_sleep_mode: bool = True
    """Free vLLM weights + KV cache during training (GPU only; ignored on CPU)."""
    sleep_level: Literal[1, 2] = 2
    """vLLM sleep level: 2 discards the weights (every weight is re-synced from the actor before the
    next rollout, so a host copy would be wasted); 1 offloads them to host memory."""
    load_format: Literal["auto", "dummy"] = "dummy"
    """How vLLM gets its first weights: 'dummy' skips reading the checkpoint, because the trainer
    syncs the actor's weights before the first rollout; 'auto' reads `model.hf_path`."""
    enforce_eager: bool = False
    """Disable CUDA graphs (always on for CPU)."""
    eval_n: int = 1
    """Samples per prompt at evaluation (pass@1 is averaged over them)."""
    eval_temperature: float = 0.0
    """Evaluation temperature (0 = greedy)."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """'colocated': every rank runs Megatron and a vLLM engine, one phase at a time. 'disaggregated':
    the world splits into trainer ranks (Megatron, the first world_size - num_ranks ranks) and rollout
    ranks (vLLM only, the last num_ranks); the weights go trainer -> rollout over their own process group
    (train/disaggregated.py)."""
    num_ranks: int = 0
    """Rollout ranks when disaggregated (a multiple of rollout.tp, fewer than the world size); 0 when colocated."""
    max_staleness: int = 0
    """How many weight versions older than the trainer's a trained group may be sampled from: 0 =
    synchronous; 1 = one step off policy (generating step k+1 overlaps training step k); k > 1 = a bounded
    queue of whole groups, each tagged with its weight version, older ones dropped (train/async_loop.py;
    one request is in flight at a time, so k > 1 deepens the queue, not the overlap). Above 0 needs
    placement=disaggregated."""
    partial: bool = False
    """Partial rollouts (rollout/partial.py): the rollout ranks generate in segments of `segment_tokens`
    and answer as soon as a batch of whole groups is complete; unfinished groups wait on the rollout
    ranks and continue under the next weights. Every token keeps the version that sampled it and its
    own behaviour log-prob. Needs placement=disaggregated and max_staleness >= 1."""
    segment_tokens: int = 128
    """With `partial`: tokens per generation segment, at most (between segments the engine checks
    whether a batch is complete; smaller cuts the tail finer and re-reads the prefix more often)."""

    def __post_init__(self) -> None:
        _require(self.tp >= 1, f"rollout.tp must be >= 1, got {self.tp}")
        self._check_placement()
        _require(self.temperature > 0, f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def _check_placement(self) -> None:
        _require(
            self.placement in ("colocated", "disaggregated"),
            f"rollout.placement must be colocated or disaggregated, got {self.placement!r}",
        )
        _require(
            isinstance(self.max_staleness, int) and self.max_staleness >= 0,
            f"rollout.max_staleness must be an integer >= 0, got {self.max_staleness!r}",
        )
        _require(isinstance(self.partial, bool), f"rollout.partial must be true or false, got {self.partial!r}")
        if self.placement == "colocated":
            _require(
                self.num_ranks == 0,
                f"rollout.num_ranks={self.num_ranks} needs rollout.placement=disaggregated "
                "(colocated: every rank rolls out)",
            )
            _require(
                self.max_staleness == 0,
                f"rollout.max_staleness={self.max_staleness} needs rollout.placement=disaggregated: colocated vLLM and "
                "Megatron take turns on the same devices, so nothing overlaps",
            )
            _require(
                not self.partial,
                "rollout.partial needs rollout.placement=disaggregated: colocated generation ends before every update, "
                "so no weights arrive while a sequence is unfinished",
            )
            return
        _require(
            self.num_ranks >= 1 and self.num_ranks % self.tp == 0,
            f"rollout.num_ranks ({self.num_ranks}) must be >= 1 and a multiple of rollout.tp ({self.tp}) "
            "with rollout.placement=disaggregated",
        )
        _require(
            not self.partial or self.max_staleness >= 1,
            "rollout.partial needs rollout.max_staleness >= 1: at 0 every batch is sampled by the weights that "
            "train it, so no sequence may continue under other weights",
        )
        _require(
            isinstance(self.segment_tokens, int) and self.segment_tokens >= 1,
            f"rollout.segment_tokens must be an integer >= 1, got {self.segment_tokens!r}",
        )

    def trainer_ranks(self, world_size: int) -> int:
        """Ranks that run Megatron in a world of `world_size`."""
        return world_size - self.num_ranks if self.placement == "disaggregated" else world_size
