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

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.config.model import ModelConfig, OffloadConfig, ParallelConfig
from agpo_megatron.config.rollout import RolloutConfig
from agpo_megatron.config.validate import require as _require
from agpo_megatron.data.datasets import DatasetConfig

REWARD_RANGES: dict[str, tuple[float, float]] = {"math": (0.0, 1.0)}
"""(lowest, highest) accuracy reward of each `data.reward`. With the length reward on, an all-correct
group still scores exactly r_max: its length reward is 0 (AGPO m2)."""

FP32_MAX = 3.4028234663852886e38
"""torch.finfo(torch.float32).max, without importing torch here."""


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
        self._check_routing_replay()
        _require(
            self.parallel.ep == 1 or not self.batch.packing,
            f"parallel.ep={self.parallel.ep} needs batch.packing=false: every expert-parallel rank must run "
            "the same number of micro-batches of one shape, and packed plans differ per rank",
        )
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
        _require(
            self.rollout.max_staleness == 0 or not self.algo.dynamic_sampling.enabled,
            f"rollout.max_staleness={self.rollout.max_staleness} with algo.dynamic_sampling.enabled: the "
            "asynchronous loop generates one round per step (set max_staleness 0 or turn dynamic sampling off)",
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
        if self.batch.updates_per_rollout * self.algo.ppo_epochs > 1 or self.rollout.max_staleness > 0:
            return  # (stale groups: even the first update runs at newer weights than sampled them)
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

    def _check_routing_replay(self) -> None:
        replay = self.algo.routing_replay
        if replay == "none":
            return
        field = f"algo.routing_replay={replay}"
        if replay == "r3":  # vLLM's own routing (whether this machine's vLLM can return it: check_machine)
            _require(
                self.rollout.placement == "colocated",
                f"{field} needs rollout.placement=colocated (remote engines do not send routing records)",
            )
        else:
            _require(
                self.rollout.logprob_mode == "recompute",
                f"{field} replays the trainer's own old-log-prob forward: it needs rollout.logprob_mode=recompute",
            )
        _require(
            not self.model.recompute_activations,
            f"{field} needs model.recompute_activations=false (a recomputed forward would route afresh)",
        )
        _require(
            not self.parallel.sequence_parallel,
            f"{field} needs parallel.sequence_parallel=false (each router sees only a sequence shard)",
        )

    def check_machine(self) -> None:
        """Checks of what the machine that runs the ranks can do. Not part of validation, so that
        `agpo check` and `agpo plan` accept a GPU config on a login node or a laptop; `agpo train`
        runs them before any model or engine is built (cli's launcher, `Session.create`)."""
        if self.algo.routing_replay == "r3":  # only vLLM's GPU model runner returns the routed experts
            from agpo_megatron.runtime.vllm_features import routed_experts_unavailable

            why = routed_experts_unavailable()
            _require(
                why is None,
                f"algo.routing_replay=r3 replays the routing vLLM sampled with, but {why}; use r2 or none",
            )

    def check_world(self, world_size: int) -> int:
        """Checks that need the (whole) world size; returns the trainer's data-parallel size."""
        r = self.rollout
        if r.placement == "disaggregated":
            _require(
                r.num_ranks < world_size,
                f"rollout.num_ranks ({r.num_ranks}) must be below the world size {world_size}: "
                "at least one rank must train",
            )
        else:
            _require(world_size % r.tp == 0, f"world size {world_size} is not a multiple of rollout.tp")
        trainers = r.trainer_ranks(world_size)
        what = f"trainer ranks {trainers} (world {world_size} - rollout.num_ranks)" if trainers != world_size else ""
        mp = self.parallel.tp * self.parallel.pp
        _require(trainers % mp == 0, f"{what or f'world size {world_size}'} is not a multiple of tp x pp = {mp}")
        dp = trainers // mp
        # Megatron folds the expert grid (etp x ep x expert-dp x pp) onto the same ranks as the dense one.
        emp = self.parallel.etp * self.parallel.ep * self.parallel.pp
        _require(
            trainers % emp == 0,
            f"parallel.ep={self.parallel.ep}: {what or f'world size {world_size}'} is not a multiple of "
            f"etp x ep x pp = {emp}",
        )
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
