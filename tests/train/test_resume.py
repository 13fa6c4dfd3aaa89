"""Exact resume, kill -9 during a save, and preemption, end to end on CPU (world size 2, fp32).

Each run is `agpo train` on a tiny random model and synthetic arithmetic, launched the way srun
launches it: two rank processes (RANK/WORLD_SIZE/MASTER_*), in one process group, so a test can
signal the ranks or kill the whole group, and read each rank's own exit code. An interrupted run
that resumes must log the same per-step metrics (reward, loss, grad norm, KL, ...) and end with
byte-identical checkpoint files (weights and optimizer state) as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agpo_megatron.checkpoint import step_dirs
from agpo_megatron.runtime import run_lock
from agpo_megatron.runtime.parallel import free_port
from agpo_megatron.runtime.preempt import EXIT_PREEMPTED
from tests.train.tiny_run import write_tiny_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# Adaptive KL and clip: their controllers' state must survive the restart too (the adaptive clip
# needs off-policy updates: 2 PPO mini-batches per rollout).
TRAIN = [
    "model.params_dtype=float32",
    "model.spec=local",
    "model.max_seq_len=96",
    "parallel.seed=1",
    "algo.group_size=4",
    "algo.loss.kl_coef=0.01",
    "algo.adaptive_kl_target=0.01",
    "algo.adaptive_clip=true",
    "optim.lr=0.001",
    "rollout.max_new_tokens=16",
    "rollout.kv_cache_memory_bytes=33554432",
    "rollout.enforce_eager=true",
    "rollout.enable_sleep_mode=false",
    "batch.prompts_per_rollout=4",
    "batch.prompts_per_update=2",
    "batch.micro_batch_size=4",  # 2 updates per rollout: the clip acts
    "data.train.max_prompt_tokens=32",
    "logging.progress_bar=false",
    f"steps={STEPS}",
]
COMPARED = (
    "reward/mean",
    "acc/mean",
    "len/mean",
    "train/pg_loss",
    "train/grad_norm",
    "train/kl_ref",
    "train/approx_kl",
    "train/entropy",
    "train/kl_coef",
    "train/eps_low",
    "train/lr",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("tiny"))


class Ranks:
    """Two `agpo train` rank processes in one new process group, logging to files."""

    def __init__(self, tiny: Path, run: Path, *overrides: str, env: dict[str, str] | None = None):
        self.run = run
        run.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "agpo_megatron.cli",
            "train",
            "--config",
            str(tiny / "train.yaml"),
            *TRAIN,
            f"model.hf_path={tiny / 'model'}",
            f"logging.out_dir={run / 'out'}",
            f"checkpoint.save_dir={run / 'ckpt'}",
            *overrides,
        ]
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        for rank in range(2):
            rank_env = {
                **os.environ,
                **(env or {}),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT),
            }
            group = {"process_group": 0 if rank == 0 else self.procs[0].pid}
            with open(run / f"rank{rank}.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=rank_env, cwd=ROOT, **group)
                )

    def log(self, rank: int = 0) -> str:
        return (self.run / f"rank{rank}.log").read_text(errors="replace")

    def wait(self, timeout: float = 240) -> list[int]:
        """Each rank's exit code; kills the group and fails on a hang."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"run timed out after {timeout}s\n{self.log()[-4000:]}") from None

    def wait_for(self, predicate, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill_group()
                raise AssertionError(f"condition not reached (or a rank exited)\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def kill_group(self) -> None:
        try:
            os.killpg(self.procs[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.procs:
            p.wait()


def _train(tiny: Path, run: Path, *overrides: str, env: dict[str, str] | None = None) -> Path:
    ranks = Ranks(tiny, run, *overrides, env=env)
    assert ranks.wait() == [0, 0], ranks.log()[-6000:]
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same steps and metrics, and byte-identical final weights + optimizer state."""
    got, want = _rows(run), _rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in COMPARED:
            assert g[key] == w[key], f"step {g['step']}: {key} {g[key]!r} != {w[key]!r}"
    final = step_dirs.step_name(STEPS)
    assert step_dirs.read_latest(run / "ckpt").name == final
    a, b = run / "ckpt" / final, reference / "ckpt" / final
    got, want = _tensors(a), _tensors(b)
    assert sorted(got) == sorted(want) and "embedding.word_embeddings.weight" in got
    assert any("exp_avg_sq" in k for k in got)  # the Adam state is compared too
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the uninterrupted run"
    # common.pt (scheduler, step) exists under megatron-core 0.16; 0.19 keeps that state inside the
    # .distcp files, where the per-step LR and step metrics above already pin it down.
    names = ["rng/rank_00000.pt", "rng/rank_00001.pt"] + (["common.pt"] if (b / "common.pt").exists() else [])
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs from the uninterrupted run"


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (weights and optimizer state), by key, in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, torch.Tensor):
            flat[prefix.rstrip(".")] = node

    walk(torch.load(out, weights_only=False), "")
    out.unlink()
    return flat


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run (DP=2): 4 steps, a checkpoint after the last."""
    return _train(tiny, tmp_path_factory.mktemp("straight"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_finished_run_extends_exactly(tiny, straight, tmp_path):
    """Issue 20: a run trained to steps=2 continues to steps=4 (a constant LR needs no flag) exactly as
    the run planned at 4 steps: the same metrics, weights, optimizer state and RNG."""
    _train(tiny, tmp_path, "steps=2")
    ranks = Ranks(tiny, tmp_path, f"steps={STEPS}")
    assert ranks.wait() == [0, 0], ranks.log()[-6000:]
    assert f"extending the run from steps=2 to steps={STEPS} (the LR schedule is unchanged)" in ranks.log()
    assert_same_run(tmp_path, straight)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_preempted_run_saves_exits_75_and_resumes_exactly(tiny, straight, tmp_path):
    # save_interval=0: only the last step is a save step, so the checkpoint below is the preemption's.
    ranks = Ranks(tiny, tmp_path)
    # The line comes after the world exists, so both ranks have their handlers by then. Only rank 1
    # is signalled: rank 0 must stop after the same step through the all-reduced flag.
    ranks.wait_for(lambda: "starting fresh" in ranks.log())
    ranks.procs[1].send_signal(signal.SIGTERM)
    codes = ranks.wait()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], ranks.log()[-6000:]
    latest = step_dirs.read_latest(tmp_path / "ckpt")
    stopped = step_dirs.step_of(latest)
    assert 1 <= stopped < STEPS and step_dirs.is_complete(latest)
    assert f"preempted after step {stopped}" in ranks.log()
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, stopped + 1))

    _train(tiny, tmp_path)  # resume=auto
    assert f"resuming from {latest}" in ranks.log()
    assert_same_run(tmp_path, straight)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("point", ["shards", "before_rename", "before_latest"])
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tiny, straight, tmp_path, point):
    ranks = Ranks(
        tiny, tmp_path, "checkpoint.save_interval=1", "checkpoint.keep_last=1", env={step_dirs.KILL_ENV: f"{point}:2"}
    )
    ranks.wait_for(lambda: ranks.procs[0].poll() is not None)
    assert ranks.procs[0].returncode == -signal.SIGKILL, ranks.log()[-6000:]
    ranks.kill_group()  # rank 1 waits in a collective for a peer that is gone

    ckpt = tmp_path / "ckpt"
    assert step_dirs.read_latest(ckpt).name == "step_000001"
    assert step_dirs.is_complete(ckpt / "step_000001")
    assert (ckpt / "step_000002").exists() == (point == "before_latest")  # committed, `latest` not yet updated
    assert any(p.name.startswith(".tmp-step_000002-") for p in ckpt.iterdir()) == (point != "before_latest")

    _train(tiny, tmp_path, "checkpoint.save_interval=1", "checkpoint.keep_last=1")
    resumed = "step_000002" if point == "before_latest" else "step_000001"
    assert f"resuming from {ckpt / resumed}" in ranks.log()
    # keep_last=1, no leftovers (the run lock's file aside)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != run_lock.LOCK_NAME) == ["latest", "step_000004"]
    assert_same_run(tmp_path, straight)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tp2_kill_group_and_resume_from_saved_initial_weights(tiny, tmp_path):
    """TP=2, random init: the Reference's source is the saved `initial_weights`, not the resumed actor."""
    tp2 = ["parallel.tp=2", "rollout.tp=1", "model.init_from=random", "checkpoint.save_interval=1"]
    straight = _train(tiny, tmp_path / "straight", *tp2)
    run = tmp_path / "resumed"
    ranks = Ranks(tiny, run, *tp2, env={step_dirs.KILL_ENV: "after_latest:2"})
    ranks.wait_for(lambda: ranks.procs[0].poll() is not None)
    ranks.kill_group()
    assert step_dirs.read_latest(run / "ckpt").name == "step_000002"
    state = json.loads((run / "ckpt" / "step_000002" / step_dirs.COMPLETE_MARKER).read_text())
    assert state["reference"] == {"kind": "megatron", "path": str((run / "ckpt" / step_dirs.INITIAL).resolve())}
    assert state["layout"] == {"world_size": 2, "tp": 2, "pp": 1, "dp": 1, "ep": 1, "etp": 1}

    _train(tiny, run, *tp2)
    assert "Reference rebuilt from its recorded source: megatron" in ranks.log()
    assert_same_run(run, straight)
