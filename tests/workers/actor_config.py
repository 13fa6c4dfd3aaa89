"""The small TrainConfig the single-Actor test workers build (a tiny local-spec model, fp32 unless asked)."""

from pathlib import Path

from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import BatchConfig, DataConfig, OptimConfig, RolloutConfig, TrainConfig
from agpo_megatron.data.datasets import DatasetConfig


def actor_config(
    hf_dir: Path,
    *,
    algo: AlgoConfig,
    optim: OptimConfig | None = None,
    dtype: str = "float32",
    tp: int = 1,
    prompts: int = 2,
) -> TrainConfig:
    """What a worker that drives `policy.Actor` directly needs; only the model, algo and optimizer matter."""
    return TrainConfig(
        model=ModelConfig(hf_path=str(hf_dir), params_dtype=dtype, spec="local", max_seq_len=64),
        parallel=ParallelConfig(tp=tp),
        algo=algo,
        optim=optim or OptimConfig(lr=1e-3),
        rollout=RolloutConfig(max_new_tokens=16),
        batch=BatchConfig(prompts_per_rollout=prompts, micro_batch_size=2),
        data=DataConfig(train=DatasetConfig(path="unused.jsonl", answer_format="raw", max_prompt_tokens=16)),
    )
