"""Who holds the GPU when: vLLM and Megatron share every device, one phase at a time.

    rollout phase: vLLM weights + KV cache on the device; Megatron's offloaded state on host
        generate
    to_train():    engine.sleep() -> actor state back on the device
        reward/advantage -> old/ref log-probs -> update -> checkpoint (vLLM asleep)
    to_rollout():  grads + optimizer state to host -> engine.wake_weights() -> weight sync
                   -> params to host -> engine.wake_kv_cache()

Why this order. The engine's weights come back before its KV cache and are overwritten by the
sync while the KV cache is still asleep, so the largest allocation (the KV cache, sized by
`rollout.gpu_memory_utilization`) is made last, into memory that training has given up. The sync
reads the actor's params, so they leave the device only after it; grads and optimizer state are
not read by it, so they leave before vLLM's weights arrive. `torch.cuda.empty_cache()` hands
the freed blocks back to the driver: vLLM allocates through its own CuMem pool, which cannot use
blocks cached by PyTorch.

The engine is asleep when the trainer gets it (train/session.py); `start()` is the first
`to_rollout()` (vLLM then serves exactly the actor's weights from step 0, also with
`rollout.load_format=dummy`), and `finish()` puts it back to sleep with the actor resident, so a
second `train()` on the same session (the demo's baseline run) builds its actor while vLLM sleeps.

A checkpoint save reads the params and the optimizer state, which must not share the GPU with
vLLM's weights and KV cache (at 32B and DP=2 Adam state alone leaves no room for them; issue 18).
The trainer saves between steps, after the step's metrics row is logged (so a crash after the
commit never loses that row): `actor_resident` puts vLLM to sleep first, brings the actor back
without its grads, and hands the weights back to vLLM afterwards, one extra weight sync per save.

Disaggregated (rollout.placement=disaggregated): the engine is a `rollout.remote.RemoteRollout`
on other ranks' devices (`shares_device = False`), so nothing moves: each hand-over to the rollout
phase is only the versioned weight sync (and a save's second sync of the same version sends nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from agpo_megatron.rollout.base import RolloutEngine


class ActorState(Protocol):
    """What the colocation moves on the Megatron side (offload.ActorMemory)."""

    def offload_train_state(self) -> None: ...

    def offload_params(self) -> None: ...

    def reload(self, *, grads: bool = True) -> None: ...


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Colocation:
    """The memory hand-overs between the rollout phase and the train phase.

    `sync` pushes the actor's current weights into the engine (bridge.export.sync_weights), as
    version `self.version`.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        actor_state: ActorState,
        sync: Callable[[], object],
        empty_cache: Callable[[], None] = _empty_cache,
    ):
        self.engine, self.actor_state, self.sync, self.empty_cache = engine, actor_state, sync, empty_cache
        self.training = True  # the session hands over a sleeping engine; the actor is built on the device
        self.version = 0
        """The trainer step the actor's current weights come from (what the next sync tells the engine)."""
        self.shared = getattr(engine, "shares_device", True)
        """False for an engine on other devices (disaggregated): no memory changes hands."""

    def to_train(self) -> None:
        """After generate: vLLM frees its memory, Megatron's state comes back."""
        self.engine.sleep()
        if self.shared:
            self.actor_state.reload()
        self.training = True

    def to_rollout(self, version: int | None = None) -> None:
        """After the update of step `version` (None: the current one again): weights first, synced, then
        the KV cache."""
        if version is not None:
            self.version = version
        if self.shared:
            self.actor_state.offload_train_state()
            self.empty_cache()
        self.engine.wake_weights()
        self.sync()
        if self.shared:
            self.actor_state.offload_params()
            self.empty_cache()
        self.engine.wake_kv_cache()
        self.training = False

    @contextlib.contextmanager
    def actor_resident(self) -> Iterator[None]:
        """The actor's params and optimizer state on the device, vLLM asleep (a checkpoint save).

        In the train phase, where the loop saves, nothing moves. In the rollout phase vLLM sleeps
        first, the grads stay on host (a save does not read them), and the hand-over back to the
        rollout phase follows as after an update."""
        if self.training:
            yield
            return
        self.engine.sleep()
        if self.shared:
            self.actor_state.reload(grads=False)
        self.training = True
        try:
            yield
        finally:
            self.to_rollout()

    def start(self, version: int = 0) -> None:
        """The engine sleeps, the actor is built: serve the actor's weights (those of step `version`:
        0 on a fresh run, the resumed step otherwise)."""
        self.to_rollout(version)

    def finish(self) -> None:
        """Leave as found: the engine asleep, the actor resident."""
        self.to_train()
