"""rollout.placement=disaggregated end to end on CPU (issue 21).

Staleness 0: a colocated run of 1 rank and a disaggregated run of 2 ranks (1 trainer + 1 rollout rank)
have the same trainer layout (TP=PP=DP=1), the same number of vLLM replicas (one) and the same seeds,
so they must log the same metrics and end with the same weights and optimizer state, bit for bit:
the weights reach the rollout rank as exact bytes, every request is seeded from (step, prompt index)
only, and the engine is built alike on both sides (a world of one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agpo_megatron.runtime.parallel import free_port
from tests.train.test_resume import _tensors
from tests.train.tiny_run import write_tiny_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
TRAIN = [
    "model.params_dtype=float32",
    "model.spec=local",
    "model.max_seq_len=96",
    "parallel.seed=3",
    "algo.group_size=4",
    "optim.lr=0.001",
    "rollout.max_new_tokens=16",
    "rollout.kv_cache_memory_bytes=33554432",
    "rollout.enforce_eager=true",
    "rollout.enable_sleep_mode=false",
    "batch.prompts_per_rollout=4",
    "batch.prompts_per_update=2",
    "batch.micro_batch_size=4",
    "data.train.max_prompt_tokens=32",
    "logging.progress_bar=false",
    f"steps={STEPS}",
]
NOT_COMPARED = ("time/", "cpu_time/", "throughput/", "mem/")
"""Wall times and memory differ between any two runs; everything else must not."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("tiny"))


def start_ranks(
    tiny: Path, run: Path, nproc: int, *overrides: str, config: str = "train.yaml"
) -> list[subprocess.Popen]:
    """`agpo train` on `nproc` rank processes (1: a plain world of one), logging to run/rank{r}.log."""
    args = [
        sys.executable,
        "-m",
        "agpo_megatron.cli",
        "train",
        "--config",
        str(tiny / config),
        *TRAIN,
        f"model.hf_path={tiny / 'model'}",
        f"logging.out_dir={run / 'out'}",
        f"checkpoint.save_dir={run / 'ckpt'}",
        *overrides,
    ]
    run.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for rank in range(nproc):
        env = dict(base)
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(run / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    return procs


def run_train(
    tiny: Path, run: Path, nproc: int, *overrides: str, timeout: float = 240, config: str = "train.yaml"
) -> list[dict]:
    """`start_ranks`, waited for; the metrics rows."""
    procs = start_ranks(tiny, run, nproc, *overrides, config=config)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((run / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(nproc))
    assert codes == [0] * nproc, logs
    return [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_disaggregated_at_staleness_0_reproduces_the_colocated_run(tiny, tmp_path):
    colocated = run_train(tiny, tmp_path / "colocated", 1)
    split = run_train(
        tiny, tmp_path / "split", 2, "rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=0"
    )
    assert [r["step"] for r in split] == [r["step"] for r in colocated] == list(range(1, STEPS + 1))
    for got, want in zip(split, colocated):
        keys = {k for k in want if not k.startswith(NOT_COMPARED)}
        assert keys == {k for k in got if not k.startswith(NOT_COMPARED)}
        assert {"reward/mean", "train/pg_loss", "train/grad_norm", "len/mean"} <= keys
        for k in sorted(keys):
            same = got[k] == want[k] or (got[k] != got[k] and want[k] != want[k])  # nan: e.g. no correct answer
            assert same, f"step {want['step']}: {k} {got[k]!r} != {want[k]!r}"
    final = f"step_{STEPS:06d}"
    a, b = _tensors(tmp_path / "split" / "ckpt" / final), _tensors(tmp_path / "colocated" / "ckpt" / final)
    assert sorted(a) == sorted(b) and any("exp_avg_sq" in k for k in a)
    for key in b:
        assert torch.equal(a[key], b[key]), f"{key} differs between the placements"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_step_off_policy_overlaps_and_versions_advance(tiny, tmp_path):
    rows = run_train(
        tiny,
        tmp_path / "async",
        2,
        "rollout.placement=disaggregated",
        "rollout.num_ranks=1",
        "rollout.max_staleness=1",
        "steps=3",
        "algo.loss.rollout_correction=tis",
        "algo.loss.tis_cap=2",  # the stale groups' behaviour log-probs reach the loss
    )
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The trainer's weights advance one version per step; step 1 trains on the starting weights'
    # samples (age 0), steps 2 and 3 on samples of the version before theirs (age 1): all 4 groups reused.
    assert [r["async/weights_version"] for r in rows] == [0, 1, 2]
    assert [r["async/age_max"] for r in rows] == [0, 1, 1]
    assert [r["async/age_mean"] for r in rows] == [0, 1, 1]
    assert [r["async/reused_groups"] for r in rows] == [0, 4, 4]
    assert [r["async/dropped_groups"] for r in rows] == [0, 0, 0]
    sampled = [r["async/weights_version"] - r["async/age_max"] for r in rows]
    assert sampled == [0, 0, 1]  # the sampling versions advance too
    assert all(r["train/grad_norm"] > 0 and "time/rollout_wait" in r for r in rows)
    # The correction sees the staleness: on policy (step 1) vLLM's and Megatron's fp32 log-probs agree,
    # one version off they do not.
    assert rows[0]["train/rc_weight_max"] == pytest.approx(1.0, abs=1e-3)
    assert rows[1]["train/rc_weight_max"] > 1.01 and rows[2]["train/rc_weight_max"] > 1.01


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_async_resume_refills_the_queue_from_the_saved_weights(tiny, tmp_path):
    """Staleness > 0 resumes as defined (train/async_loop.py): the saved step is the weights' version,
    nothing queued is saved, and the resumed run samples its first batch from the saved weights
    (age 0), then runs one step off again. Evaluation goes through the rollout rank too."""
    run = tmp_path / "async"
    split = ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=1"]
    first = run_train(tiny, run, 2, *split, "steps=2", config="train_eval.yaml")
    results = json.loads((run / "out" / "results.json").read_text())
    assert results["eval_before"]["num_prompts"] == results["eval_after"]["num_prompts"] == 32
    rows = run_train(tiny, run, 2, *split, "steps=4", config="train_eval.yaml")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == first
    assert json.loads((run / "out" / "results.json").read_text())["resumed_at_step"] == 2
    assert [r["async/weights_version"] for r in rows] == [0, 1, 2, 3]
    assert [r["async/age_max"] for r in rows] == [0, 1, 0, 1]  # step 3: sampled from the saved weights


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_trainer_leaves_no_orphan_rollout_rank(tiny, tmp_path):
    """The trainer leader dies mid-run (SIGKILL: no goodbye): the rollout rank notices on the link and
    exits by itself, with one line naming the trainer rank, instead of serving nobody forever."""
    run = tmp_path / "killed"
    split = ["rollout.placement=disaggregated", "rollout.num_ranks=1", "rollout.max_staleness=1", "steps=200"]
    trainer, rollout = start_ranks(tiny, run, 2, *split)
    metrics = run / "out" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().strip()):
            assert time.monotonic() < deadline and trainer.poll() is None, (run / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        trainer.kill()
        trainer.wait()
        code = rollout.wait(timeout=120)  # a hang here fails the test (TimeoutExpired)
    finally:
        for p in (trainer, rollout):
            if p.poll() is None:
                p.kill()
                p.wait()
    log = (run / "rank1.log").read_text(errors="replace")
    assert code != 0
    line = next(x for x in log.splitlines() if x.startswith("agpo train: rank 1 failed"))
    assert "LinkError: the link to world rank(s) [0] failed: a dead trainer rank" in line, log[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_partial_rollouts_end_to_end(tiny, tmp_path):
    """rollout.partial: the rollout rank holds one batch more than it answers, generates in 2-token
    segments and answers the first 4 complete groups; the rest continue under the next weights, and
    their tokens reach the loss with their own versions and behaviour log-probs.

    Ragged lengths: the model copy declares 40 of its 128 tokens end-of-turn (generation_config.json),
    so a response ends after about 3 tokens and groups finish at different segments."""
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    gen = model / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.exists() else {}
    eos = config.get("eos_token_id")
    config["eos_token_id"] = [*([] if eos is None else [eos] if isinstance(eos, int) else eos), *range(20, 60)]
    gen.write_text(json.dumps(config))
    rows = run_train(
        tiny,
        tmp_path / "partial",
        2,
        f"model.hf_path={model}",
        "rollout.placement=disaggregated",
        "rollout.num_ranks=1",
        "rollout.max_staleness=1",
        "rollout.partial=true",
        "rollout.segment_tokens=2",
        "steps=3",
        "algo.loss.rollout_correction=tis",
        "algo.loss.tis_cap=2",
    )
    info = [{k: v for k, v in r.items() if k.startswith("async/")} for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["async/weights_version"] for r in rows] == [0, 1, 2]
    assert [r["async/dropped_groups"] for r in rows] == [0, 0, 0]
    # Steps 1-2 ask for the batches of steps 2-3; step 3's batch was asked for already (no request).
    assert all(r["async/carried_groups"] + r["async/ready_groups"] == 4 for r in rows[:2]), info
    assert "async/segments" not in rows[2]
    # Each group was finished by weights at most 2 versions old (the queue's bound with partial rollouts:
    # S + 1); its tokens may be older. Request 2 ran at the starting weights (the first sync follows it),
    # so its carried groups continued under version 1 in request 3, trained at step 3 (version 2): tokens
    # 2 versions old.
    assert all(r["async/age_max"] <= 2 and r["async/token_age_max"] >= r["async/age_max"] for r in rows), info
    assert rows[0]["async/paused_token_frac"] == rows[1]["async/paused_token_frac"] == 0, info
    assert rows[2]["async/paused_token_frac"] > 0 and rows[2]["async/token_age_max"] == 2, info
    assert all(r["train/grad_norm"] > 0 for r in rows)
