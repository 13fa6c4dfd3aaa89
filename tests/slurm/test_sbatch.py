"""slurm/agpo.sbatch on a real Slurm cluster: the user's own command, its requeue logic, and a
preempted job that requeues and resumes.

Needs a running cluster named by AGPO_SLURM_CONF (its slurm.conf); `.ci/run` starts one with
`scripts/slurm_local.sh start ROOT` and stops it afterwards. Without one, these tests skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agpo_megatron.report.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
SLURM_CONF = os.environ.get("AGPO_SLURM_CONF", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SLURM_CONF,
        reason="no Slurm cluster: run `scripts/slurm_local.sh start ROOT` and export "
        "AGPO_SLURM_CONF=ROOT/etc/slurm.conf (.ci/run does)",
    ),
]
TINY_FLAGS = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SLURM_CONF": SLURM_CONF,
        "PYTHON": sys.executable,
        "RUN_DIR": str(tmp_path / "run"),
        "AGPO_CACHE_DIR": str(tmp_path / "cache"),
        "CONFIG": "examples/tiny_cpu.yaml",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }
    return env


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SLURM_CONF": SLURM_CONF},
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_done(job_id: str, timeout_s: float) -> dict[str, str]:
    """Poll until the job ends. A requeued job waits the cluster's cred_expire before it restarts
    (15 s on scripts/slurm_local.sh's cluster). NOTE: forcing it sooner (StartTime=now) races the
    revoked credential of its previous run, and Slurm then fails the job."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = _job(job_id)
        if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env={**os.environ, "SLURM_CONF": SLURM_CONF})
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s: {_job(job_id).get('JobState')}")


def _submit(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


@pytest.mark.timeout(600)
def test_users_sbatch_command_runs_tiny_config_on_two_cpu_ranks(tmp_path):
    # The user's own command; only where the output goes differs (and the test's interpreter is PYTHON).
    cmd = [
        "sbatch",
        "--wait",
        f"--output={tmp_path}/%j.out",
        *TINY_FLAGS,
        "slurm/agpo_qwen7b.sbatch",
        "steps=3",
        "checkpoint.save_interval=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=580)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert proc.returncode == 0, log[-6000:]
    job = _job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NumTasks"]) == ("COMPLETED", "0:0", "2")
    assert "2 tasks on 1 node(s), cpu" in log
    # srun --label: every line of a task starts with its rank. The console is quiet (issue 20): rank 0
    # prints progress, every rank's library output goes to run/logs/rank<N>.log.
    assert re.search(r"^0: ", log, re.M), "no output from rank 0"
    run = tmp_path / "run"
    for rank in (0, 1):
        assert (run / "logs" / f"rank{rank}.log").stat().st_size > 0, f"no log from rank {rank}"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "checkpoints" / "step_000003").is_dir()
    assert (run / "results.json").is_file()


@pytest.mark.timeout(300)
def test_exit_75_requeues_the_job_and_the_requeued_run_finishes(tmp_path):
    # The trainer stands in as a script: exit 75 (preempted) first, 0 after the requeue.
    fake_log = tmp_path / "fake.log"
    env = _env(tmp_path, PYTHON=str(ROOT / "tests/slurm/fake_python.sh"), FAKE_LOG=str(fake_log))
    job_id = _submit(tmp_path, env, *TINY_FLAGS, "slurm/agpo_qwen7b.sbatch", "steps=3")
    job = _wait_done(job_id, 240)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "requeueing job" in log and "restart 1," in log  # --open-mode=append keeps both runs' output
    assert sorted(fake_log.read_text().splitlines()) == [f"train rank={r} restart={n}" for r in (0, 1) for n in (0, 1)]


@pytest.mark.timeout(600)
def test_preempted_job_saves_requeues_resumes_and_finishes(tmp_path):
    # 8 steps: the signal must land while the job still runs (4 tiny steps can end within a poll).
    job_id = _submit(
        tmp_path, _env(tmp_path), *TINY_FLAGS, "slurm/agpo_qwen7b.sbatch", "steps=8", "checkpoint.save_interval=1"
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert time.time() < deadline and _job(job_id)["JobState"] in ("PENDING", "RUNNING"), (
            "no step before preemption"
        )
        time.sleep(0.5)
    # What `#SBATCH --signal=USR1@120` delivers before the time limit: SIGUSR1 to the job steps' tasks.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env={**os.environ, "SLURM_CONF": SLURM_CONF})
    job = _wait_done(job_id, 500)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    assert "requeueing job" in log
    rows = read_jsonl(metrics)
    assert rows[-1]["step"] == 8 and {r["step"] for r in rows} == set(range(1, 9))
    assert (tmp_path / "run" / "checkpoints" / "step_000008").is_dir()
