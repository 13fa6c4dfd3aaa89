"""The order of the memory hand-overs between vLLM and Megatron (train/colocate.py, train/trainer.py, the engine).

GPU memory is not needed to check the order: fakes record every call, and the real `train()` loop
runs against them. `check_order` states the rules; it is also run on the order the trainer used
before (KV cache woken before the weight sync, nothing asleep while the actor is built) to show
that the rules catch it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import load_config
from agpo_megatron.data.datasets import Example
from agpo_megatron.rollout.base import Completion
from agpo_megatron.runtime.parallel import Layout
from agpo_megatron.train import trainer
from agpo_megatron.train.colocate import Colocation

ROLLOUT_TO_TRAIN = ["engine.sleep", "actor.reload"]
TRAIN_TO_ROLLOUT = [
    "actor.offload_train_state",
    "empty_cache",
    "engine.wake_weights",
    "sync",
    "actor.offload_params",
    "empty_cache",
    "engine.wake_kv_cache",
]


def check_order(calls: list[str]) -> None:
    """The rules, on a recorded call list (engine.*, actor.*, sync, build.*, generate)."""
    asleep, synced = {"weights", "kv_cache"}, False  # the session hands out a sleeping engine
    for i, c in enumerate(calls):
        where = f"call {i} ({c}) in {calls}"
        if c == "engine.build":  # as vLLM comes up: awake, with weights
            asleep, synced = set(), True
        elif c == "engine.sleep":
            asleep, synced = {"weights", "kv_cache"}, False
        elif c == "engine.wake_weights":
            asleep.discard("weights")
        elif c == "sync":
            assert "weights" not in asleep, f"sync into sleeping weights: {where}"
            assert "kv_cache" in asleep, f"KV cache woken before the weight sync: {where}"
            synced = True
        elif c == "engine.wake_kv_cache":
            assert synced, f"KV cache woken before the weights were synced: {where}"
            asleep.discard("kv_cache")
        elif c.startswith("build."):
            assert asleep == {"weights", "kv_cache"}, f"Megatron model built while vLLM is awake: {where}"
        elif c in ("generate", "evaluate"):
            assert not asleep and synced, f"{c} before wake_weights -> sync -> wake_kv_cache: {where}"
        elif c in ("actor.logprobs", "ref.logprobs", "actor.policy_step"):
            assert asleep == {"weights", "kv_cache"}, f"{c} while vLLM is awake: {where}"
        elif c.startswith("save_checkpoint"):  # issue 18: a save with vLLM awake OOMs at scale
            assert asleep == {"weights", "kv_cache"}, f"checkpoint saved while vLLM is awake: {where}"
            awake, resident = residency(calls[:i])
            assert not awake and {"params", "optimizer"} <= resident, f"save without the actor resident: {where}"


class Recorder:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name):
        return lambda *a, **k: self.calls.append(name)


class FakeEngine:
    def __init__(self, rec: Recorder):
        self.rec = rec
        for name in ("sleep", "wake_weights", "wake_kv_cache"):
            setattr(self, name, rec(f"engine.{name}"))

    def generate(self, prompts, n, sampling):
        self.rec.calls.append("generate")
        return [
            [
                Completion(
                    prompt_index=i,
                    token_ids=[5, 6, 7][: 1 + (i + j) % 3],
                    logprobs=None,
                    text="x",
                    finish_reason="stop",
                )
                for j in range(n)
            ]
            for i in range(len(prompts))
        ]


class FakeActorState:
    def __init__(self, rec: Recorder):
        self.rec = rec
        for name in ("offload_train_state", "offload_params"):
            setattr(self, name, rec(f"actor.{name}"))

    def reload(self, *, grads: bool = True) -> None:
        self.rec.calls.append("actor.reload" if grads else "actor.reload_without_grads")


def residency(calls: list[str]) -> tuple[set[str], set[str]]:
    """(vLLM's parts awake, the actor's parts on the device) after `calls`, from a sleeping engine
    and a resident actor (how the session hands them over)."""
    awake, resident = set(), {"params", "grads", "optimizer"}
    for c in calls:
        if c in ("engine.build", "engine.wake_weights"):
            awake |= {"weights", "kv_cache"} if c == "engine.build" else {"weights"}
        elif c == "engine.wake_kv_cache":
            awake.add("kv_cache")
        elif c == "engine.sleep":
            awake = set()
        elif c == "actor.reload":
            resident = {"params", "grads", "optimizer"}
        elif c == "actor.reload_without_grads":
            resident |= {"params", "optimizer"}
        elif c == "actor.offload_train_state":
            resident -= {"grads", "optimizer"}
        elif c == "actor.offload_params":
            resident.discard("params")
    return awake, resident


def saving_every_step(tmp_path, *overrides: str) -> TrainConfig:
    """A fake-run config that saves a checkpoint after every step (for the save-time checks)."""
    base = [
        "data.train.path=unused.jsonl",
        "data.train.answer_format=boxed",
        "batch.prompts_per_rollout=2",
        "batch.micro_batch_size=4",
        "algo.group_size=2",
        "algo.loss.kl_coef=0.01",
        f"logging.out_dir={tmp_path}",
        "logging.progress_bar=false",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=1",
    ]
    return load_config(TrainConfig, None, [*base, *overrides])


def test_colocation_transitions_in_order():
    rec = Recorder()
    colo = Colocation(FakeEngine(rec), FakeActorState(rec), sync=rec("sync"), empty_cache=rec("empty_cache"))
    colo.start()
    assert rec.calls == TRAIN_TO_ROLLOUT
    rec.calls.clear()
    colo.to_train()
    assert rec.calls == ROLLOUT_TO_TRAIN
    rec.calls.clear()
    colo.to_rollout()
    colo.finish()
    assert rec.calls == TRAIN_TO_ROLLOUT + ROLLOUT_TO_TRAIN


def test_check_order_rejects_the_old_order():
    # train/trainer.py before train/colocate.py: the engine stayed awake after construction, the actor was
    # built and synced into it, and wake() woke the KV cache before the sync.
    old = [
        "build.actor",
        "sync",
        "evaluate",
        "generate",
        "engine.sleep",
        "actor.logprobs",
        "actor.policy_step",
        "engine.wake_weights",
        "engine.wake_kv_cache",
        "sync",
        "generate",
    ]
    with pytest.raises(AssertionError, match="built while vLLM is awake"):
        check_order(["engine.build", *old])
    with pytest.raises(AssertionError, match="KV cache woken before"):
        check_order(["engine.build", *old[3:]])  # even with the build order fixed, wake() is wrong
    check_order(
        [
            "engine.build",
            "engine.sleep",
            "build.actor",
            *TRAIN_TO_ROLLOUT,
            "generate",
            *ROLLOUT_TO_TRAIN,
            "actor.policy_step",
        ]
    )


# ---- the real train() loop, on fakes -----------------------------------------------------------


class FakeActor:
    def __init__(self, rec: Recorder):
        rec.calls.append("build.actor")
        self.rec, self.model, self.chunks, self.optimizer, self.scheduler = rec, "model", ["ddp"], "opt", "sched"
        self.pad_multiple = 8

    def logprobs(self, mbs, *, temperature):
        self.rec.calls.append("actor.logprobs")
        return [{"logprobs": torch.zeros_like(mb["targets"], dtype=torch.float)} for mb in mbs]

    def policy_step(self, mbs, loss_cfg, **kw):
        self.rec.calls.append("actor.policy_step")
        return {"pg_loss": 0.0, "kl_ref": 0.0, "approx_kl": 0.0}


class FakeSession:
    def __init__(self, cfg: TrainConfig, rec: Recorder):
        self.cfg, self.rec, self.arch, self.pad_id = cfg, rec, "arch", 0
        self.layout = Layout(rank=0, world_size=1, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
        self.rollout = FakeEngine(rec)
        self.train_examples = [Example(prompt_ids=[1, 2, 3 + i], prompt_text="q", gold="1", index=i) for i in range(8)]

    def train_sampling(self, step):
        return None

    def task_metrics(self, completions, correct=None):
        return {}

    def evaluate(self, step):
        self.rec.calls.append("evaluate")
        assert self.rollout  # the fake engine's generate is what an evaluation calls first
        return {"pass@1": 0.0}


def patch_trainer(monkeypatch, rec: Recorder) -> None:
    """Replace what train() builds around the actor (weight sync, memory, reward, checkpoints) with fakes."""
    monkeypatch.setattr(trainer, "sync_weights", lambda chunks, arch, engine, **kw: rec.calls.append("sync"))
    monkeypatch.setattr(trainer, "ActorMemory", lambda chunks, opt, cfg: FakeActorState(rec))
    monkeypatch.setattr(
        trainer,
        "score_distributed",
        lambda texts, golds, **kw: (torch.tensor([float(i % 2) for i in range(len(texts))]), None, {}),
    )
    monkeypatch.setattr(
        trainer,
        "Colocation",
        lambda engine, state, sync: Colocation(engine, state, sync, empty_cache=rec("empty_cache")),
    )

    class FakeReference:
        def resident(self):
            return contextlib.nullcontext()

        def logprobs(self, mbs, *, temperature):
            rec.calls.append("ref.logprobs")
            return [{"logprobs": torch.zeros_like(mb["targets"], dtype=torch.float)} for mb in mbs]

    class FakeCheckpointer:  # run_checkpoint.RunCheckpointer's part of the loop
        def __init__(self, cfg, layout, actor, sampler, kl_ctl, clip_ctl, resident):
            self.actor, self.resident, self.kl_ctl, self.clip_ctl = actor, resident, kl_ctl, clip_ctl

        def reference(self, arch, *, warm_start):
            rec.calls.append("build.reference")  # the real one copies from the actor's model
            return FakeReference()

        def resume(self):
            return 1, self.kl_ctl.beta, self.clip_ctl.eps

        def maybe_save(self, step, kl_coef, eps, *, force=False):
            with self.resident():  # the actor's state may be offloaded between steps
                rec.calls.append("save_checkpoint (forced)" if force else "save_checkpoint")

    monkeypatch.setattr(trainer, "RunCheckpointer", FakeCheckpointer)


def test_train_loop_runs_the_phases_in_order(tmp_path, monkeypatch):
    rec = Recorder()
    patch_trainer(monkeypatch, rec)
    cfg = saving_every_step(tmp_path, "steps=2", "eval_interval=1")
    session = FakeSession(cfg, rec)
    actor = FakeActor(rec)
    trainer.train(session, actor=actor)

    # One update per rollout: it is on-policy, so the actor needs no log-prob pass of its own (train/ppo.py).
    # The save runs after the step's row is logged: vLLM sleeps for it first and the actor comes back
    # without its grads (issue 18), then the weights go back to vLLM.
    step = ["generate", *ROLLOUT_TO_TRAIN, "ref.logprobs", "actor.policy_step", *TRAIN_TO_ROLLOUT]
    save = ["engine.sleep", "actor.reload_without_grads", "save_checkpoint", *TRAIN_TO_ROLLOUT]
    assert rec.calls == [
        "build.actor",
        "build.reference",
        *TRAIN_TO_ROLLOUT,
        "evaluate",
        *step,
        "evaluate",  # eval_interval=1 (not at the last step)
        *save,
        *step,
        *save,
        "evaluate",
        *ROLLOUT_TO_TRAIN,
    ]  # eval_after, then asleep as it was found
    check_order(rec.calls)


def test_every_save_sees_vllm_asleep_and_the_actor_resident_also_the_forced_one(tmp_path, monkeypatch):
    """Issue 18 item 1: the save read the offloaded actor back while vLLM's weights and KV cache were
    awake (OOM at scale). Recorded at the moment of each save: the engine's state and the actor's
    residency, for the interval save of step 1 and the save that a preemption forces at step 2."""
    from agpo_megatron.runtime import preempt

    rec = Recorder()
    patch_trainer(monkeypatch, rec)
    asks = iter([False, True])
    monkeypatch.setattr(trainer.preempt, "requested", lambda: next(asks))
    cfg = saving_every_step(tmp_path, "steps=5")
    with pytest.raises(preempt.Preempted):
        trainer.train(FakeSession(cfg, rec), actor=FakeActor(rec))
    saves = [(i, c) for i, c in enumerate(rec.calls) if c.startswith("save_checkpoint")]
    assert [c for _, c in saves] == ["save_checkpoint", "save_checkpoint (forced)"]
    for i, _ in saves:  # vLLM asleep, the actor's params and optimizer state back; its grads stay on host
        assert residency(rec.calls[:i]) == (set(), {"params", "optimizer"}), rec.calls[:i]
    check_order(rec.calls)


def test_a_save_between_steps_puts_vllm_to_sleep_and_leaves_the_grads_on_host():
    """`actor_resident` in the rollout phase: vLLM sleeps before the actor comes back, without grads."""
    rec = Recorder()
    colo = Colocation(FakeEngine(rec), FakeActorState(rec), sync=rec("sync"), empty_cache=rec("empty_cache"))
    colo.start()
    rec.calls.clear()
    with colo.actor_resident():
        rec.calls.append("save_checkpoint")
    assert rec.calls == ["engine.sleep", "actor.reload_without_grads", "save_checkpoint", *TRAIN_TO_ROLLOUT]
    check_order(["engine.build", "engine.sleep", *TRAIN_TO_ROLLOUT, *rec.calls])
    rec.calls.clear()
    colo.to_train()
    with colo.actor_resident():  # the train phase: already resident, nothing moves
        rec.calls.append("save_checkpoint")
    assert rec.calls == [*ROLLOUT_TO_TRAIN, "save_checkpoint"]


def test_each_step_uses_and_logs_the_controllers_current_values(tmp_path, monkeypatch):
    """Issue 10: with kl_coef=0 + an adaptive target, step 1 ran at beta=0 while the controller started
    above it, and the logged beta / eps were the ones chosen for the NEXT step. Every update of a
    rollout runs at that rollout's values."""
    import json

    from agpo_megatron.algo.controllers import (
        AdaptiveClipConfig,
        AdaptiveClipController,
        AdaptiveKLConfig,
        AdaptiveKLController,
    )

    rec, used = Recorder(), []

    class MovingActor(FakeActor):  # the policy moves: KL above both targets, so beta grows and eps shrinks
        def policy_step(self, mbs, loss_cfg, **kw):
            used.append((kw["kl_coef"], kw["eps"]))
            # update 1 runs at the sampling weights (approx_kl 0); eps_t must see the later ones' KL only
            return {"pg_loss": 0.0, "kl_ref": 0.05, "approx_kl": 0.0 if kw["on_policy"] else 0.05}

    patch_trainer(monkeypatch, rec)
    cfg = load_config(
        TrainConfig,
        None,
        [
            "data.train.path=unused.jsonl",
            "data.train.answer_format=boxed",
            "steps=3",
            "batch.prompts_per_rollout=2",
            "batch.prompts_per_update=1",
            "batch.micro_batch_size=2",
            "algo.group_size=2",
            "algo.loss.kl_coef=0",
            "algo.adaptive_kl_target=0.01",
            "algo.adaptive_clip=true",
            f"logging.out_dir={tmp_path}",
            "logging.progress_bar=false",
            "algo.kl_controller.beta_min=1e-4",
            "algo.clip_controller.horizon=5",
        ],
    )
    trainer.train(FakeSession(cfg, rec), actor=MovingActor(rec))

    kl_ctl = AdaptiveKLController(AdaptiveKLConfig(init_beta=1e-4, target_kl=0.01))
    clip_ctl = AdaptiveClipController(AdaptiveClipConfig(init_eps_low=0.2, init_eps_high=0.2, horizon=5))
    expected = [(kl_ctl.beta, (clip_ctl.eps_low, clip_ctl.eps_high))]
    for _ in range(2):
        expected.append((kl_ctl.update(0.05), clip_ctl.update(0.05)))
    assert used[::2] == used[1::2]  # 2 updates per rollout, both at the rollout's values
    used = used[::2]
    assert used == expected
    # kl_coef=0 starts at algo.kl_controller.beta_min; both controllers did adapt
    assert used[0][0] == 1e-4 and used[1][0] > used[0][0] and used[1][1][0] < 0.2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["train/kl_coef"], (r["train/eps_low"], r["train/eps_high"])) for r in rows if "train/kl_coef" in r]
    assert logged == used
