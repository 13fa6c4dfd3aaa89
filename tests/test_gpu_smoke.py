"""The one-GPU smoke suite (tests/gpu/smoke.py, scripts/gpu_smoke.sh) on CPU: its dry-run lists every
check and passes; a renamed project function makes it fail; the cpu-logic mode runs the checks' own
code at tiny sizes on gloo. None of this says anything about GPU behaviour (docs/gpu-status.md)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.smoke import ALL_CHECKS, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^SMOKE (\S+) (PASS|FAIL|SKIP|READY)( .*)?$")


def _smoke(*args: str, out: Path, extra_pythonpath: Path | None = None, timeout: int = 600):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_pythonpath), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = proc.stdout.splitlines()
    status = {}
    for ln in lines:
        m = LINE.match(ln)
        if m:
            assert m.group(1) not in status, f"check {m.group(1)} reported twice:\n{proc.stdout}"
            status[m.group(1)] = m.group(2)
    return proc, status, lines


@pytest.mark.slow
def test_dry_run_lists_every_check_and_passes(tmp_path):
    proc, status, lines = _smoke("--dry-run", "--json", str(tmp_path / "copy.json"), out=tmp_path / "out")
    detail = f"\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert list(status) == list(ALL_CHECKS), detail
    assert set(status.values()) <= {"READY", "SKIP"}, detail
    # SKIP only where an optional package is absent from this machine
    for s in SECTIONS:
        for c in s.checks:
            if status[c] == "SKIP":
                assert s.needs, f"{c} skipped though it needs nothing optional{detail}"
    n_ready, n_skip = list(status.values()).count("READY"), list(status.values()).count("SKIP")
    assert lines[-1].startswith(f"0 passed, 0 failed, {n_skip} skipped, {n_ready} ready"), detail
    doc = json.loads((tmp_path / "copy.json").read_text())
    assert doc["mode"] == "dry-run" and [r["check"] for r in doc["results"]] == list(ALL_CHECKS)
    assert (tmp_path / "out" / "results.json").read_text() == (tmp_path / "copy.json").read_text()
    fused = next(r for r in doc["results"] if r["check"] == "fused_loss_parity")["fields"]
    assert (fused["n"], fused["h"], fused["v"]) == (4096, 3584, 152064)  # the size, checked not run


@pytest.mark.slow
def test_dry_run_fails_when_a_project_function_is_renamed(tmp_path):
    """A `sitecustomize` removes parallel.comm_device in every process, as a rename would."""
    shim = _shim(tmp_path, "import agpo_megatron.runtime.parallel as p\ndel p.comm_device\n")
    proc, status, lines = _smoke(
        "--dry-run", "--only", "nccl_world,policy_step,fused_loss", out=tmp_path / "out", extra_pythonpath=shim
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert status["nccl_world"] == status["policy_step"] == "FAIL"
    assert all(status[c] == "READY" for c in ("fused_loss_parity", "fused_loss_time", "fused_loss_memory"))
    assert "comm_device" in next(ln for ln in lines if ln.startswith("SMOKE nccl_world "))
    assert lines[-1].startswith("0 passed, 2 failed, 0 skipped")


def _shim(tmp_path: Path, body: str) -> Path:
    """A `sitecustomize` that every process of the run imports first (breaks a check on purpose)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(body)
    return shim


@pytest.mark.slow
def test_a_crashing_section_is_a_fail_and_the_next_one_still_runs(tmp_path):
    shim = _shim(tmp_path, "import os\nimport tests.gpu.checks_env as m\nm.run_env = lambda ctx: os.abort()\n")
    proc, status, lines = _smoke("--cpu-logic", "--only", "env,nccl_world", out=tmp_path / "out", extra_pythonpath=shim)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert status == {"env": "FAIL", "nccl_world": "PASS"}, proc.stdout
    assert "not reported: worker exited" in next(ln for ln in lines if ln.startswith("SMOKE env "))


@pytest.mark.slow
def test_a_hanging_section_is_stopped_at_its_timeout(tmp_path, monkeypatch):
    from tests.gpu.smoke import _spawn

    shim = _shim(tmp_path, "import time\nimport tests.gpu.checks_env as m\nm.run_env = lambda ctx: time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shim), str(ROOT)]))
    for d in ("logs", "results"):
        (tmp_path / d).mkdir()
    got, why = _spawn("env", "cpu-logic", {}, tmp_path, [], timeout=8)
    assert got == [] and why.startswith("timed out after 8s"), why


@pytest.mark.slow
def test_gpu_mode_without_cuda_fails_env_and_skips_the_rest(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, status, _ = _smoke("--only", "env,nccl_world", out=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert status == {"env": "FAIL", "nccl_world": "SKIP"}


@pytest.mark.slow
def test_cpu_logic_runs_every_check_that_can_run_on_cpu(tmp_path):
    proc, status, lines = _smoke("--cpu-logic", out=tmp_path, timeout=1500)
    detail = f"\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert list(status) == list(ALL_CHECKS), detail
    cuda_only = {c for s in SECTIONS if not s.cpu_logic for c in s.checks}
    # no CUDA allocator / no vLLM sleep mode on CPU: those two lines are SKIPs by design
    expect_skip = cuda_only | {"fused_loss_memory", "vllm_sleep_wake_memory"}
    assert {c for c, st in status.items() if st == "SKIP"} == expect_skip, detail
    assert lines[-1] == f"{len(ALL_CHECKS) - len(expect_skip)} passed, 0 failed, {len(expect_skip)} skipped", detail
