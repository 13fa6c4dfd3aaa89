"""The training config: nested typed dataclasses, one per concern.

Load with `load_train_config(path, overrides)`; every field has a docstring and each section
validates itself in `__post_init__`. Cross-section checks that need the model's shape (TP divides
heads, PP divides layers) read only the HF `config.json`, so a bad config fails in milliseconds,
before any process group, model or vLLM engine exists.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import ClassVar, Literal

from agpo_megatron.algo.controllers import AdaptiveClipConfig, AdaptiveKLConfig
from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.yaml_io import ConfigError
from agpo_megatron.data.datasets import DatasetConfig

REWARD_RANGES: dict[str, tuple[float, float]] = {"math": (0.0, 1.0)}
"""(lowest, highest) accuracy reward of each `data.reward`. With the length reward on, an all-correct
group still scores exactly r_max: its length reward is 0 (AGPO m2)."""

FP32_MAX = 3.4028234663852886e38
"""torch.finfo(torch.float32).max, without importing torch here."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    hf_path: str = ""
    """HF model directory (config.json, tokenizer, optionally safetensors weights), or `tiny:<qwen2|qwen3|llama>`
    for the CPU demo's tiny model, generated on first use (agpo_megatron/models/inputs.py)."""
    init_from: Literal["hf", "random", "megatron"] = "hf"
    """Where actor weights come from: the HF safetensors in `hf_path`, random init, or a
    Megatron dist checkpoint (`checkpoint.load_dir`)."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: Transformer Engine ('te', GPU only), Megatron-local ('local'), or
    'auto' = TE when CUDA and TE are present, else local."""
    local_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local spec: torch's `scaled_dot_product_attention` (one fused kernel,
    models/sdpa_attention.py) or Megatron's unfused `DotProductAttention` (baddbmm, masked softmax,
    bmm), the reference it is tested against. The TE spec ignores it."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter / compute dtype (Megatron keeps fp32 main params in the optimizer for 16-bit)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format through Transformer Engine (Hopper+); requires spec te. 'hybrid' = E4M3 forward,
    E5M2 gradients."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (Megatron's `fp8_recipe`); mxfp8 needs Blackwell."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history window (Megatron-Bridge's FP8 preset: 1024; Megatron: 1)."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: scale from the window's max amax or the latest (Megatron-Bridge: max)."""
    fp8_margin: int = 0
    """Delayed scaling: scale margin, in powers of 2."""
    max_seq_len: int = 4096
    """Longest prompt+response the trainer will ever feed (sets RoPE cache and checks)."""
    recompute_activations: bool = False
    """Full activation recomputation per layer (saves memory at ~30% more compute)."""

    def __post_init__(self) -> None:
        _require(
            self.fp8_amax_history_len >= 1, f"model.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}"
        )
        _require(self.fp8_margin >= 0, f"model.fp8_margin must be >= 0, got {self.fp8_margin}")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (Megatron)."""
    pp: int = 1
    """Pipeline-parallel size (Megatron); the trainer uses 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    seed: int = 1234
    """Base seed; Megatron derives per-TP-rank seeds, rollout derives per-replica seeds."""
    timeout_s: float = 3600.0
    """Process-group timeout for any one collective, sized for the slowest legitimate one (loading
    a 72B checkpoint, the first vLLM build)."""
    step_timeout_s: float = 1800.0
    """A rank that finishes no training step for this long exits (code 124), naming its phase, and once
    steps run every collective is bounded by it too: a hung or stopped peer fails the job instead of
    blocking it for `timeout_s`. 0 = off."""

    def __post_init__(self) -> None:
        _require(self.tp >= 1, f"parallel.tp must be >= 1, got {self.tp}")
        _require(self.pp >= 1, f"parallel.pp must be >= 1, got {self.pp}")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1")
        _require(self.timeout_s > 0, f"parallel.timeout_s must be > 0, got {self.timeout_s}")
        _require(self.step_timeout_s >= 0, f"parallel.step_timeout_s must be >= 0 (0 = off), got {self.step_timeout_s}")


@dataclasses.dataclass(kw_only=True)
class KLControllerConfig:
    """A-GRPO's adaptive beta_t (algo/controllers.py), on when `algo.adaptive_kl_target` is set. It starts
    at max(algo.loss.kl_coef, beta_min): a multiplicative controller cannot leave 0."""

    horizon: float = 10.0
    """Steps H over which a saturated error changes beta by about e^0.2; >= 1."""
    ema_decay: float = 0.9
    """Decay of the moving average of the measured KL to the reference; in [0, 1), 0 = no smoothing."""
    beta_min: float = 1e-6
    """Lower bound on beta; > 0."""
    beta_max: float = 1.0
    """Upper bound on beta; >= beta_min and >= algo.loss.kl_coef."""


@dataclasses.dataclass(kw_only=True)
class ClipControllerConfig:
    """A-GRPO's adaptive eps_t (algo/controllers.py), on with `algo.adaptive_clip`. It starts at
    algo.loss.eps_low / eps_high, which must lie in [eps_min, eps_max]."""

    target_kl: float = 0.01
    """KL between the current and the old policy (per token, `approx_kl`) to steer towards; > 0."""
    horizon: float = 10.0
    """Steps H over which a saturated error changes both clip ranges by about e^(+-0.2); >= 1."""
    ema_decay: float = 0.9
    """Decay of the moving average of the measured KL; in [0, 1), 0 = no smoothing."""
    eps_min: float = 0.05
    """Lower bound on both clip ranges; > 0."""
    eps_max: float = 0.4
    """Upper bound on both clip ranges; in [eps_min, 1) (eps_low must stay below 1)."""


@dataclasses.dataclass(kw_only=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (Yu et al. 2025): prompt groups whose accuracy rewards are all equal (all
    correct or all wrong) are dropped whole, and more prompts are sampled until batch.prompts_per_rollout
    mixed groups are collected or max_rollout_rounds is reached (train/rollout_rounds.py)."""

    enabled: bool = False
    """Turn dynamic sampling on. Each extra round samples another batch.prompts_per_rollout prompts."""
    max_rollout_rounds: int = 3
    """Most rounds of generation per step, >= 1. A step that still has too few mixed groups trains on
    those it has (whole mini-batches' worth, see train/rollout_rounds.py) and says so in
    `sampling/short_batch`."""
    allow_with_m1: bool = False
    """Run dynamic sampling together with AGPO's m1 (algo.advantage=agpo) on purpose. Refused otherwise:
    the groups m1 gives +1 / -1 are exactly the ones dynamic sampling drops, so m1 would never act."""

    def __post_init__(self) -> None:
        _require(
            self.max_rollout_rounds >= 1,
            f"algo.dynamic_sampling.max_rollout_rounds must be >= 1, got {self.max_rollout_rounds}",
        )


@dataclasses.dataclass(kw_only=True)
class OverlongConfig:
    """DAPO's overlong handling of responses that reach rollout.max_new_tokens (algo/rewards.py)."""

    filter: bool = False
    """Mask truncated responses (finish_reason "length") out of the loss: they still count in their
    group's reward statistics, but no token of theirs is trained or counted in the loss normaliser."""
    soft_punishment: bool = False
    """Add DAPO's soft overlong punishment to the reward before the advantage: 0 up to
    rollout.max_new_tokens - buffer_tokens, then falling linearly to -penalty at rollout.max_new_tokens.
    Added after the length reward (m2): r = r_acc + gamma * r_len + r_overlong."""
    buffer_tokens: int | None = None
    """Length of the punishment ramp, in tokens; in [1, rollout.max_new_tokens). None = a fifth of
    rollout.max_new_tokens, DAPO's proportion (4096 of 20480), filled in when the config loads."""
    penalty: float = 1.0
    """Punishment at rollout.max_new_tokens (DAPO: 1.0); >= 0."""

    def __post_init__(self) -> None:
        _require(
            self.buffer_tokens is None or self.buffer_tokens >= 1,
            f"algo.overlong.buffer_tokens must be >= 1, got {self.buffer_tokens}",
        )
        _require(self.penalty >= 0, f"algo.overlong.penalty must be >= 0, got {self.penalty}")


def _controller(cls, where: str, **kw):
    """`cls(**kw)`, its ValueError (which starts with the field's name) as a ConfigError naming `where`."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


@dataclasses.dataclass(kw_only=True)
class AlgoConfig:
    advantage: Literal["grpo", "drgrpo", "rloo", "agpo"] = "agpo"
    """Group advantage: GRPO (r-mean)/std, Dr.GRPO (no std), RLOO (r minus the mean of the other G-1), or
    AGPO's revised advantage (m1). Dr.GRPO also replaces the per-sequence length normalisation by a
    constant, so 'drgrpo' is Dr.GRPO only with algo.loss.agg_mode: seq-mean-token-sum-norm (warned otherwise)."""
    length_reward: bool = True
    """AGPO m2: add gamma * length reward before the advantage."""
    gamma: float = 0.1
    """Length-reward weight (paper: 0.1)."""
    group_size: int = 5
    """G: responses sampled per prompt (paper: 5)."""
    r_min: float = 0.0
    """Lowest possible reward; a uniform group at r_min gets advantage -1 (AGPO)."""
    r_max: float = 1.0
    """Highest reward a uniform group can have; uniform at r_max gets +1 (AGPO)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch, each of batch.prompts_per_rollout / prompts_per_update optimizer steps."""
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """Token-level loss: clip range, KL, entropy bonus, aggregation (see algo/loss.py)."""
    fused_loss: bool = True
    """Use the chunked vocab-parallel fused loss; False = plain reference path."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk in the fused loss (bounds live memory to chunk x vocab/TP)."""
    adaptive_kl_target: float | None = None
    """A-GRPO: if set, beta_t adapts so the moving-average KL tracks this target."""
    kl_controller: KLControllerConfig = dataclasses.field(default_factory=KLControllerConfig)
    """Settings of the adaptive beta_t (used only with adaptive_kl_target)."""
    adaptive_clip: bool = False
    """A-GRPO: adapt the clip range eps_t from the moving-average KL."""
    clip_controller: ClipControllerConfig = dataclasses.field(default_factory=ClipControllerConfig)
    """Settings of the adaptive eps_t (used only with adaptive_clip)."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient (each skipped: no update) before the run
    stops with an error."""
    dynamic_sampling: DynamicSamplingConfig = dataclasses.field(default_factory=DynamicSamplingConfig)
    """DAPO's dynamic sampling: drop uniform-accuracy groups, sample more prompts (off by default)."""
    overlong: OverlongConfig = dataclasses.field(default_factory=OverlongConfig)
    """DAPO's overlong filtering and soft overlong punishment (both off by default)."""

    def __post_init__(self) -> None:
        _require(self.group_size >= 2, f"algo.group_size must be >= 2 (group statistics need 2), got {self.group_size}")
        _require(self.gamma >= 0, f"algo.gamma must be >= 0, got {self.gamma}")
        _require(self.r_max > self.r_min, f"algo.r_max ({self.r_max}) must exceed algo.r_min ({self.r_min})")
        _require(self.ppo_epochs >= 1, f"algo.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _require(self.max_bad_steps >= 0, f"algo.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        _require(self.loss_chunk_tokens >= 1, f"algo.loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        _require(
            self.adaptive_kl_target is None or self.adaptive_kl_target > 0,
            f"algo.adaptive_kl_target must be > 0, got {self.adaptive_kl_target}",
        )
        self.kl_settings(), self.clip_settings()  # validate the controllers' settings (when they are on)
        if self.advantage == "drgrpo" and self.loss.agg_mode != "seq-mean-token-sum-norm":
            # A warning, not an error: no-std advantages under another aggregation is a legitimate
            # ablation (Dr.GRPO's two fixes one at a time), but it is not Dr.GRPO.
            warnings.warn(
                f"algo.advantage=drgrpo with algo.loss.agg_mode={self.loss.agg_mode} is not Dr.GRPO, which "
                "divides each response's token sum by a constant generation budget: set "
                "algo.loss.agg_mode=seq-mean-token-sum-norm",
                stacklevel=2,
            )
        _require(
            not self.dynamic_sampling.enabled or self.advantage != "agpo" or self.dynamic_sampling.allow_with_m1,
            "algo.dynamic_sampling.enabled with algo.advantage=agpo: dynamic sampling drops the all-correct and "
            "all-wrong groups that AGPO's m1 gives +1 / -1, so m1 would never act; use another algo.advantage, "
            "or set algo.dynamic_sampling.allow_with_m1=true to run both on purpose",
        )

    def kl_settings(self) -> AdaptiveKLConfig | None:
        """The adaptive-beta controller's settings, or None when beta is fixed."""
        if self.adaptive_kl_target is None:
            return None
        k, where = self.kl_controller, "algo.kl_controller"
        _controller(
            AdaptiveKLConfig, where, init_beta=k.beta_min, target_kl=self.adaptive_kl_target, **dataclasses.asdict(k)
        )
        _require(
            self.loss.kl_coef <= k.beta_max,
            f"algo.loss.kl_coef={self.loss.kl_coef:g} is the adaptive beta's "
            f"start and must be <= algo.kl_controller.beta_max={k.beta_max:g}",
        )
        return _controller(
            AdaptiveKLConfig,
            where,
            init_beta=max(self.loss.kl_coef, k.beta_min),
            target_kl=self.adaptive_kl_target,
            **dataclasses.asdict(k),
        )

    def clip_settings(self) -> AdaptiveClipConfig | None:
        """The adaptive-clip controller's settings, or None when eps is fixed."""
        if not self.adaptive_clip:
            return None
        c, where = self.clip_controller, "algo.clip_controller"
        _controller(AdaptiveClipConfig, where, init_eps_low=c.eps_min, init_eps_high=c.eps_min, **dataclasses.asdict(c))
        for name in ("eps_low", "eps_high"):
            value = getattr(self.loss, name)
            _require(
                c.eps_min <= value <= c.eps_max,
                f"algo.loss.{name}={value:g} is the adaptive clip's start and must "
                f"be in [algo.clip_controller.eps_min, eps_max] = [{c.eps_min:g}, {c.eps_max:g}]",
            )
        return _controller(
            AdaptiveClipConfig,
            where,
            init_eps_low=self.loss.eps_low,
            init_eps_high=self.loss.eps_high,
            **dataclasses.asdict(c),
        )


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6)."""
    min_lr: float = 0.0
    """Floor for cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    decay_style: Literal["constant", "cosine", "linear"] = "constant"
    """LR schedule after warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global grad-norm clip (0 = off)."""
    loss_scale: float | None = None
    """fp16 only: a static loss scale; None = dynamic loss scaling."""
    initial_loss_scale: float = 65536.0
    """fp16 only: the dynamic loss scale's start (halved on every overflow, which skips that step)."""
    override_schedule: bool = False
    """On resume, take the LR schedule from this config (e.g. a larger `steps`) and continue it from the saved
    optimizer step, instead of refusing a schedule that differs from the checkpoint's (Megatron-LM's
    --override-opt_param-scheduler). A longer run whose LR does not depend on the horizon (constant) needs no flag."""

    def __post_init__(self) -> None:
        # The optimizer's state and main params are fp32: a larger value is inf inside Adam (step 1's NaN).
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad", "loss_scale", "initial_loss_scale"):
            v = getattr(self, name)
            _require(
                v is None or (math.isfinite(v) and abs(v) <= FP32_MAX),
                f"optim.{name}={v} overflows float32, the optimizer's dtype (largest {FP32_MAX:.4g})",
            )
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, lr], got {self.min_lr}")
        _require(self.clip_grad >= 0, f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "optim.adam_beta1/2 must be in [0, 1)")
        _require(self.loss_scale is None or self.loss_scale > 0, f"optim.loss_scale must be > 0, got {self.loss_scale}")
        _require(self.initial_loss_scale >= 1, f"optim.initial_loss_scale must be >= 1, got {self.initial_loss_scale}")


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

    def __post_init__(self) -> None:
        _require(self.tp >= 1, f"rollout.tp must be >= 1, got {self.tp}")
        _require(self.temperature > 0, f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _require(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass(kw_only=True)
class OffloadConfig:
    """What Megatron moves to host memory while vLLM generates (GPU memory for the KV cache)."""

    params: bool = False
    """Offload the actor's bf16 params (and their fp32 main copies) during rollout."""
    grads: bool = False
    """Free the actor's fp32 grad buffer during rollout (discarded, not copied: each step zeroes it first)."""
    optimizer: bool = False
    """Offload the (distributed) optimizer's Adam state during rollout."""
    reference: bool = False
    """Keep the frozen reference on host memory except while it scores."""


@dataclasses.dataclass(kw_only=True)
class BatchConfig:
    RENAMED: ClassVar[dict[str, str]] = {"prompts_per_step": "prompts_per_rollout"}
    """Old field names and their new ones: an old config gets one line naming the new field."""

    prompts_per_rollout: int = 32
    """Prompts sampled per RL step (the rollout batch, VeRL's train_batch_size); each gets algo.group_size
    responses. A step is one rollout: `steps`, checkpoints and the prompt sampler count rollouts."""
    prompts_per_update: int | None = None
    """Prompts per optimizer step (the PPO mini-batch, VeRL's ppo_mini_batch_size; paper: 32), whole
    prompt groups. A rollout makes prompts_per_rollout / prompts_per_update optimizer steps per
    algo.ppo_epochs, the first on-policy, the later ones off-policy (where the clip acts).
    None = prompts_per_rollout."""
    micro_batch_size: int = 4
    """Sequences per forward/backward micro-batch on one data-parallel rank."""
    max_tokens_per_micro_batch: int | None = None
    """Dynamic batch size: fill micro-batches up to this many computed tokens (padding included)
    instead of micro_batch_size sequences."""
    packing: bool = True
    """Pack several sequences back to back into each row of a micro-batch (rows of the step's
    longest sequence, best-fit decreasing; attention never crosses sequences: THD on the
    Transformer Engine spec, a block-diagonal mask on the local one). Log-probs, loss and
    gradients equal the padded path's. false: one right-padded sequence per row."""

    def __post_init__(self) -> None:
        _require(
            self.prompts_per_rollout >= 1, f"batch.prompts_per_rollout must be >= 1, got {self.prompts_per_rollout}"
        )
        _require(self.micro_batch_size >= 1, f"batch.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(
            self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
            f"batch.max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}",
        )
        _require(isinstance(self.packing, bool), f"batch.packing must be true or false, got {self.packing!r}")
        n = self.update_prompts
        _require(
            1 <= n <= self.prompts_per_rollout and self.prompts_per_rollout % n == 0,
            f"batch.prompts_per_update ({n}) must be >= 1 and divide batch.prompts_per_rollout "
            f"({self.prompts_per_rollout})",
        )

    @property
    def update_prompts(self) -> int:
        """Prompts per optimizer step (prompts_per_update, or the whole rollout when unset)."""
        return self.prompts_per_rollout if self.prompts_per_update is None else self.prompts_per_update

    @property
    def update_field(self) -> str:
        """The field that sets the mini-batch, for error messages."""
        return "batch.prompts_per_rollout" if self.prompts_per_update is None else "batch.prompts_per_update"

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout and PPO epoch."""
        return self.prompts_per_rollout // self.update_prompts


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    train: DatasetConfig
    """Training prompts (required: path and answer_format at least)."""
    eval: DatasetConfig | None = None
    """Held-out prompts for accuracy / length evaluation."""
    reward: Literal["math"] = "math"
    """Reward function: math-verify answer equivalence (1/0)."""
    reward_timeout_s: float = 5.0
    """Per-answer verification timeout (seconds), for the answers the fast string/number check cannot decide."""
    reward_step_budget_s: float = 60.0
    """Budget (seconds) for all of one step's (or one evaluation's) answer checks on a rank; the checks
    run concurrently on the verifier pool and the ranks split the batch. Checks still running, or not
    yet started, when it runs out score 0 and count in reward/num_timeouts. Bounds the reward phase however many answers
    are hostile (without it: about num_answers / pool_workers x reward_timeout_s)."""
    max_drop_frac: float = 0.1
    """Largest fraction of a dataset's prompts the filters (e.g. max_prompt_tokens) may drop before
    the run stops; what was dropped, and why, is printed at startup either way."""

    def __post_init__(self) -> None:
        _require(self.reward_timeout_s > 0, f"data.reward_timeout_s must be > 0, got {self.reward_timeout_s}")
        _require(
            self.reward_step_budget_s > 0, f"data.reward_step_budget_s must be > 0, got {self.reward_step_budget_s}"
        )
        _require(0 <= self.max_drop_frac <= 1, f"data.max_drop_frac must be in [0, 1], got {self.max_drop_frac}")


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    out_dir: str = "runs/default"
    """Run directory: metrics.jsonl, resolved config, plots."""
    wandb_project: str | None = None
    """Log to Weights & Biases (set WANDB_MODE=offline to stay local)."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    save_dir: str | None = None
    """Megatron dist-checkpoint directory (None = no saving)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end); each save goes to save_dir/step_NNNNNN."""
    load_dir: str | None = None
    """Dist checkpoint to take the actor's initial weights from (with model.init_from=megatron)."""
    resume: str = "auto"
    """'auto' = continue from the newest complete checkpoint under save_dir (start fresh if none),
    'never' = always start fresh, or a path: a step folder, or a save_dir (its `latest`)."""
    keep_last: int = 0
    """Keep only the newest K step checkpoints, deleting older ones once a new one is complete (0 = keep all)."""
    verify: bool = True
    """Check every file of a checkpoint (weights, optimizer, RNG states, run state) against the checksums
    in its agpo_meta.json before loading it (resume, model.init_from=megatron); false skips the check."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        _require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
        _require(
            self.resume in ("auto", "never") or Path(self.resume).exists(),
            f"checkpoint.resume must be 'auto', 'never' or an existing checkpoint path, got {self.resume!r}",
        )

    def due(self, step: int, last_step: int) -> Path | None:
        """The directory to save `step` into, or None when this step is not a save step."""
        if not self.save_dir or not (step == last_step or (self.save_interval and step % self.save_interval == 0)):
            return None
        return Path(self.save_dir) / f"step_{step:06d}"


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Actor/reference model."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    """AGPO / GRPO / A-GRPO algorithm."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """vLLM sampling."""
    offload: OffloadConfig = dataclasses.field(default_factory=OffloadConfig)
    """Host offload of Megatron state during rollout (GPU memory plan, see `agpo plan`)."""
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    """Batch sizes."""
    data: DataConfig
    """Datasets and reward (required)."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics output."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    steps: int = 100
    """RL steps, one rollout each (`optimizer_steps()` counts the optimizer steps they make)."""
    eval_interval: int = 0
    """Evaluate every N steps (0 = only before and after)."""

    def __post_init__(self) -> None:
        _require(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        _require(
            self.model.init_from != "megatron" or bool(self.checkpoint.load_dir),
            "model.init_from=megatron needs checkpoint.load_dir (a dist checkpoint, e.g. from hf_to_megatron)",
        )
        seqs = self.batch.update_prompts * self.algo.group_size
        _require(
            seqs % self.batch.micro_batch_size == 0,
            f"batch.micro_batch_size ({self.batch.micro_batch_size}) must divide the mini-batch of "
            f"{self.batch.update_field} x algo.group_size = {seqs} sequences",
        )
        self._check_off_policy()
        _require(
            self.model.fp8 is None or self.model.spec != "local",
            "model.fp8 needs the Transformer Engine spec (model.spec te/auto on GPU)",
        )
        # With logprob_mode=rollout the old log-probs ARE the engine's, so the correction weight
        # exp(old - rollout) is exactly 1: TIS or MIS would be on in name only.
        loss = self.algo.loss
        what = (
            f"algo.loss.tis_cap={loss.tis_cap}"
            if loss.tis_cap is not None
            else f"algo.loss.rollout_correction={loss.rollout_correction}"
        )
        _require(
            loss.rollout_correction == "none" or self.rollout.logprob_mode == "recompute",
            f"{what} needs rollout.logprob_mode=recompute: with "
            f"rollout.logprob_mode={self.rollout.logprob_mode} the old log-probs are the engine's own, so "
            f"the importance weight is always 1",
        )
        lo, hi = REWARD_RANGES[self.data.reward]
        _require(
            self.algo.advantage != "agpo" or (self.algo.r_min, self.algo.r_max) == (lo, hi),
            f"algo.r_min={self.algo.r_min:g} / algo.r_max={self.algo.r_max:g} must be the {self.data.reward} reward's "
            f"range [{lo:g}, {hi:g}] (AGPO gives -1 / +1 to groups uniformly at r_min / r_max; any other "
            f"value silently gives all-wrong or all-correct groups 0)",
        )
        budget = self.rollout.max_new_tokens
        if self.algo.overlong.buffer_tokens is None:
            self.algo.overlong.buffer_tokens = max(budget // 5, 1)
        _require(
            not self.algo.overlong.soft_punishment or self.algo.overlong.buffer_tokens < budget,
            f"algo.overlong.buffer_tokens ({self.algo.overlong.buffer_tokens}) must be below rollout.max_new_tokens "
            f"({budget}): the punishment ramp ends at rollout.max_new_tokens",
        )
        if self.algo.loss.agg_mode == "seq-mean-token-sum-norm" and self.algo.loss.norm_tokens is None:
            # Dr.GRPO's constant is the generation budget.
            self.algo.loss = dataclasses.replace(self.algo.loss, norm_tokens=budget)
        longest = self.data.train.max_prompt_tokens + self.rollout.max_new_tokens
        _require(
            longest <= self.model.max_seq_len,
            f"data.train.max_prompt_tokens + rollout.max_new_tokens = {longest} exceeds model.max_seq_len "
            f"({self.model.max_seq_len})",
        )

    def eval_due(self, step: int) -> bool:
        """Whether step `step` evaluates (the runs before step 1 and after the last always do)."""
        return bool(self.eval_interval) and step % self.eval_interval == 0 and step < self.steps

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: the LR schedule's length (optim.warmup_steps counts these too)."""
        return self.steps * self.batch.updates_per_rollout * self.algo.ppo_epochs

    def _check_off_policy(self) -> None:
        """With one update per rollout every update runs at the weights that sampled it: the ratio is 1."""
        if self.batch.updates_per_rollout * self.algo.ppo_epochs > 1:
            return
        why = (
            f"batch.prompts_per_update = batch.prompts_per_rollout ({self.batch.prompts_per_rollout}) and "
            f"algo.ppo_epochs=1 make one update per rollout, at the weights that sampled it, where the clip never acts"
        )
        _require(
            not self.algo.adaptive_clip,
            f"algo.adaptive_clip needs off-policy updates (its KL would always be 0): {why}; set "
            f"batch.prompts_per_update below batch.prompts_per_rollout or algo.ppo_epochs > 1",
        )
        loss, default = self.algo.loss, PolicyLossConfig()
        if self.rollout.logprob_mode == "recompute" and (loss.eps_low, loss.eps_high) != (
            default.eps_low,
            default.eps_high,
        ):
            warnings.warn(
                f"algo.loss.eps_low/eps_high ({loss.eps_low:g}/{loss.eps_high:g}) have no effect: {why}", stacklevel=2
            )

    def check_world(self, world_size: int) -> int:
        """Checks that need the world size; returns the data-parallel size."""
        mp = self.parallel.tp * self.parallel.pp
        _require(world_size % mp == 0, f"world size {world_size} is not a multiple of tp x pp = {mp}")
        _require(world_size % self.rollout.tp == 0, f"world size {world_size} is not a multiple of rollout.tp")
        dp = world_size // mp
        prompts = self.batch.update_prompts  # each mini-batch is split over the DP ranks, whole groups each
        seqs = prompts * self.algo.group_size
        _require(
            prompts % dp == 0, f"{self.batch.update_field} ({prompts}) must be divisible by data-parallel size {dp}"
        )
        _require(
            (seqs // dp) % self.batch.micro_batch_size == 0,
            f"batch.micro_batch_size ({self.batch.micro_batch_size}) must divide the {seqs // dp} "
            f"sequences of a mini-batch per data-parallel rank",
        )
        return dp
