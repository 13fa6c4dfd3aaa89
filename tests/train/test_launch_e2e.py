"""`agpo train --nproc-per-node 2` end to end on CPU (issue 20), on the tiny config: a run owns its
folder, its console is quiet, every checkpoint file is checksummed, a changed seed on resume is one
line, a finished run extends (`optim.override_schedule`), and the run's one exit code is 75 when
preempted by a signal to the launcher, 124 when a rank hangs and 2 on a user error.

The runs share one folder and continue each other, so they are few (four start-ups in all).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agpo_megatron.checkpoint import CheckpointError, step_dirs
from agpo_megatron.checkpoint.metadata import SIDECAR, read_meta, verify_checkpoint
from agpo_megatron.runtime.run_lock import LOCK_NAME
from agpo_megatron.train.run_checkpoint import SKIP_HINT

ROOT = Path(__file__).resolve().parents[2]
LR = 2e-4
BASE = [
    "optim.decay_style=cosine",  # the LR depends on the run's length: extending it needs the override
    f"optim.lr={LR}",
    "checkpoint.save_interval=2",
]


class Launcher:
    """`agpo train --nproc-per-node 2` with the console (its stdout and stderr) captured to files."""

    def __init__(self, run: Path, name: str, *overrides: str):
        self.out, self.err = run.parent / f"{name}.out", run.parent / f"{name}.err"
        cmd = [
            sys.executable,
            "-m",
            "agpo_megatron.cli",
            "train",
            "--nproc-per-node",
            "2",
            "--config",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            f"logging.out_dir={run}",
            f"checkpoint.save_dir={run / 'ckpt'}",
            *BASE,
            *overrides,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)

    def console(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"timed out\n{self.console()[-4000:]}") from None

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise AssertionError(f"{text!r} never appeared\n{self.console()[-4000:]}")
            time.sleep(0.1)

    def ranks(self) -> list[int]:
        """The rank processes (the supervisor's children, rank 0 first)."""
        raw = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(p) for p in raw.split()]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, Launcher, Launcher]:
    """A 4-step run, and a second run started into the same folder while the first is going."""
    run = tmp_path_factory.mktemp("launch") / "run"
    a = Launcher(run, "a")
    deadline = time.monotonic() + 120
    while not ((run / LOCK_NAME).is_file() and (run / LOCK_NAME).read_text()):  # a's launcher owns the folder
        assert time.monotonic() < deadline and a.proc.poll() is None, a.console()
        time.sleep(0.05)
    b = Launcher(run, "b", "parallel.seed=7")  # tens of seconds before a's ranks have started up
    b.wait(timeout=120)
    a.wait()
    return run, a, b


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_owns_its_folder_and_its_console_is_quiet(first):
    run, a, b = first
    assert a.proc.returncode == 0, a.console()[-4000:]
    console = a.console().splitlines()
    assert len(console) <= 15, "\n".join(console)
    assert sum(line.startswith("step ") for line in console) == 4
    assert any("eval_after: pass@1" in line for line in console)
    # The libraries' output is in the ranks' log files, not on the console.
    for rank in (0, 1):
        assert "vLLM" in (run / "logs" / f"rank{rank}.log").read_text(errors="replace") or "INFO" in (
            run / "logs" / f"rank{rank}.log"
        ).read_text(errors="replace")
    assert "INFO" not in a.console() and "Warning" not in a.console()
    logs = "".join(p.read_text(errors="replace") for p in (run / "logs").glob("rank*.log"))
    assert "Overwriting old incomplete" not in logs + a.console()  # normal saves go into an empty folder
    # The second run failed at start, in one line naming the holder, and wrote nothing.
    assert b.proc.returncode == 2
    err = [line for line in b.console().splitlines() if "warning:" not in line]  # the config's warning: a's too
    assert len(err) == 1 and f"is in use by another run (pid {a.proc.pid} on " in err[0], b.console()
    assert a.proc.poll() is not None and "is in use" not in a.console()
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    assert [p.name for p in step_dirs.complete_steps(run / "ckpt")] == ["step_000002", "step_000004"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_checkpoint_file_is_checksummed_and_verified(first, tmp_path):
    run, _, _ = first
    step = run / "ckpt" / "step_000004"
    sums = read_meta(step).checksums
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(sums) == [f for f in files if f != SIDECAR]
    assert {"run_state.json", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(sums)
    verify_checkpoint(step, SKIP_HINT)
    # The two silent corruptions: the sampler's position in the run state (4 prompts a step out
    # of 256: step_in_epoch 4 after step 4), and one bit of an RNG file.
    for rel, corrupt in (
        ("run_state.json", lambda b: b.replace(b'"step_in_epoch": 4', b'"step_in_epoch": 3')),
        ("rng/rank_00001.pt", lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]),
    ):
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(step, copy)
        before = (copy / rel).read_bytes()
        (copy / rel).write_bytes(corrupt(before))
        assert (copy / rel).read_bytes() != before
        with pytest.raises(CheckpointError) as e:
            verify_checkpoint(copy, SKIP_HINT)
        assert str(e.value).startswith(f"{copy / rel}: checksum mismatch") and "checkpoint.verify=false" in str(e.value)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_resume_with_another_seed_is_one_line_and_exit_2(first):
    run, _, _ = first
    c = Launcher(run, "c", "parallel.seed=2", "steps=8", "optim.override_schedule=true")
    assert c.wait() == 2
    errors = [line for line in c.console().splitlines() if "error" in line.lower()]
    assert len(errors) == 1, c.console()[-3000:]
    assert "was saved with parallel.seed=1, this run has parallel.seed=2" in errors[0]
    assert "resume with parallel.seed=1" in errors[0] and "checkpoint.resume=never" in errors[0]
    assert "Traceback" not in c.console() and "ChildFailedError" not in c.console()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_extension_then_preemption_exits_75_then_a_hang_exits_124(first):
    run, _, _ = first
    # Extend the finished 4-step run to 8 steps with the new horizon; SIGUSR1 to the launcher.
    e = Launcher(run, "e", "steps=8", "optim.override_schedule=true")
    e.wait_for("step 5/8")
    e.proc.send_signal(signal.SIGUSR1)
    assert e.wait() == 75, e.console()[-4000:]
    assert "optim.override_schedule: the LR schedule now ends at optimizer step 8 (was 4)" in e.console()
    assert "preempted after step" in e.console() and "Traceback" not in e.console()
    rows = _rows(run)
    last = rows[-1]["step"]
    assert 5 <= last < 8 and [r["step"] for r in rows] == list(range(1, last + 1))
    assert (run / "ckpt" / step_dirs.step_name(last)).is_dir()  # saved at the preemption
    # Cosine over 8 optimizer steps (one per RL step here), lr after step 5's update:
    # 2e-4 * (cos(5 pi / 8) + 1) / 2 = 2e-4 * (1 - 0.382683) / 2 = 6.17317e-5
    assert rows[4]["train/lr"] == pytest.approx(6.17317e-5, rel=1e-5)
    assert rows[4]["train/lr"] == pytest.approx(LR * (math.cos(5 * math.pi / 8) + 1) / 2, rel=1e-12)

    # Resume again and stop rank 1 after one step: rank 0's watchdog fires, the launcher kills rank 1.
    f = Launcher(run, "f", "steps=8", "optim.override_schedule=true", "parallel.step_timeout_s=20")
    f.wait_for(f"step {last + 1}/8")
    os.kill(f.ranks()[1], signal.SIGSTOP)
    assert f.wait() == 124, f.console()[-4000:]
    console = f.console()
    assert "rank 0: no training step finished" in console and "at step" in console
    assert "killed the rank(s) still running: 1" in console
    assert "Traceback" not in console and "ChildFailedError" not in console
