"""Load a run's config: YAML + dotted overrides, generated inputs resolved, validated, and checked
against the model's config.json, all before any process group or tensor exists.

`load_train_config` is what the CLI, the demo, the benchmarks and the tests call. It lives here, not
in `config/`, because it needs the generators of `models/` and `data/` and the model's shape, and
`config/` sits below both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import ConfigError, load_config
from agpo_megatron.data.inputs import resolve_dataset
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.models.inputs import resolve_model


def resolve(data: dict[str, Any]) -> None:
    """Rewrite generated-input specs in a raw config dict (in place), before validation."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("hf_path"), str):
        model["hf_path"] = resolve_model(model["hf_path"])
    datasets = data.get("data")
    if isinstance(datasets, dict):
        for split in ("train", "eval"):
            ds = datasets.get(split)
            if isinstance(ds, dict) and isinstance(ds.get("path"), str):
                ds["path"] = resolve_dataset(ds["path"], f"data.{split}.path")


def check_model_shape(cfg: TrainConfig) -> None:
    """TP/PP against the model's shape, from config.json alone."""
    if not Path(cfg.model.hf_path, "config.json").is_file():
        raise ConfigError(f"model.hf_path: no config.json in {cfg.model.hf_path!r}")
    arch = read_arch(cfg.model.hf_path)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    _require(
        arch.num_attention_heads % tp == 0,
        f"parallel.tp={tp} must divide the {arch.num_attention_heads} attention heads",
    )
    _require(
        arch.num_query_groups % tp == 0,
        f"parallel.tp={tp} must divide the {arch.num_query_groups} query groups (KV heads)",
    )
    _require(arch.num_layers % pp == 0, f"parallel.pp={pp} must divide the {arch.num_layers} layers")
    ep, etp = cfg.parallel.ep, cfg.parallel.etp
    if not arch.is_moe:
        _require(
            ep == 1 and etp == 1,
            f"parallel.ep={ep} / parallel.etp={etp} need an MoE model ({arch.model_type} is dense)",
        )
        _require(
            cfg.algo.routing_replay == "none",
            f"algo.routing_replay={cfg.algo.routing_replay} needs an MoE model ({arch.model_type} is dense)",
        )
    else:
        _require(arch.num_experts % ep == 0, f"parallel.ep={ep} must divide the {arch.num_experts} experts")
        _require(
            arch.moe_ffn_hidden_size % etp == 0,
            f"parallel.etp={etp} must divide the experts' {arch.moe_ffn_hidden_size} ffn width",
        )
        # Megatron's MoELayer raises in training with attention TP > 1 and no sequence parallelism.
        _require(
            tp == 1 or cfg.parallel.sequence_parallel,
            f"parallel.tp={tp} with an MoE model needs parallel.sequence_parallel=true "
            "(Megatron's MoE layer refuses tensor parallelism without it in training)",
        )
    # vLLM splits the KV heads over its TP ranks, or replicates each over tp / KV-heads ranks when
    # rollout.tp exceeds them (QKVParallelLinear); the query heads always split.
    rtp, g = cfg.rollout.tp, arch.num_query_groups
    _require(
        arch.num_attention_heads % rtp == 0 and (g % rtp == 0 or rtp % g == 0),
        f"rollout.tp={rtp} must divide the heads ({arch.num_attention_heads}) and divide or be a multiple "
        f"of the KV heads ({g})",
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> a validated `TrainConfig`, its model shape checked."""
    cfg = load_config(TrainConfig, path, overrides, prepare=resolve)
    if cfg.model.hf_path:
        try:
            check_model_shape(cfg)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{path or '<overrides>'}: {e}") from None
    return cfg
