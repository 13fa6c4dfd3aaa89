"""A disaggregated run: the world splits into trainer ranks and rollout ranks (rollout.placement).

    trainer ranks: Session (Megatron, as a colocated world of their size) + the loop:
                   train/trainer.py at rollout.max_staleness 0, train/async_loop.py above
    rollout ranks: a vLLM engine (no Megatron model, ever), serving the trainer leader's requests
                   (rollout/remote.py `serve`) until it says stop

The split and the link between the two sides: runtime/placement.py. At staleness 0 the trainer
loop is the colocated one, line for line, with a `RemoteRollout` as its engine: same prompts, same
seeds, same weights at every generate, hence the same run (tests/train/test_disaggregated.py).
"""

from __future__ import annotations

from typing import Any

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.rollout.remote import RemoteRollout, serve
from agpo_megatron.runtime.placement import Placement, split_world


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` on this rank's side; the rollout ranks return {} once the trainer is done."""
    placement = split_world(cfg.rollout.num_ranks, timeout_s=cfg.parallel.timeout_s)
    if placement.role == "rollout":
        serve_rollout(cfg, placement)
        return {}
    from agpo_megatron.train.session import Session

    session = Session.create(cfg, placement)
    engine = session.rollout
    assert isinstance(engine, RemoteRollout)
    try:
        if cfg.rollout.max_staleness == 0:
            from agpo_megatron.train.trainer import train

            return train(session)
        from agpo_megatron.train.async_loop import train_async

        return train_async(session)
    finally:
        engine.close()  # the rollout ranks leave their loop (also after a failed step: no orphan engine)


def serve_rollout(cfg: TrainConfig, placement: Placement) -> int:
    """A rollout rank: build the engine (collective over the rollout ranks) and serve; returns requests served."""
    from agpo_megatron.rollout.vllm_engine import VLLMEngine

    assert placement.link is not None
    cfg.check_world(placement.world_size)
    engine = VLLMEngine.from_config(cfg.rollout, cfg.model, seed=cfg.parallel.seed)
    return serve(engine, placement.link, step_timeout_s=cfg.parallel.step_timeout_s)
