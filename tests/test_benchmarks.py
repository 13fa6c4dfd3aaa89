"""The benchmark scripts still run against the current trainer API (they are not imported by the
package, so nothing else notices when a signature changes). Timings are printed, never asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import torchrun


@pytest.mark.slow
def test_step_benchmark_runs_both_settings_on_a_tiny_model(tmp_path):
    out = torchrun(
        "../../benchmarks/step.py",
        "--out",
        tmp_path,
        "--steps",
        "2",
        "--repeats",
        "1",
        "--dist",
        "ragged",
        "--prompts",
        "4",
        "--group",
        "4",
        "--hidden",
        "128",
        "--layers",
        "2",
        timeout=300,
    )
    assert "[ragged]" in out and "| logprobs+update |" in out
    efficiency = out.split("padding efficiency (real / computed tokens): padded ")[1].split()
    padded, packed = float(efficiency[0].rstrip(",")), float(efficiency[2].rstrip(";"))
    assert 0 < padded < packed <= 1  # packing computes fewer tokens on a ragged batch


@pytest.mark.slow
def test_update_benchmark_runs_both_updates(tmp_path):
    out = torchrun(
        "../../benchmarks/update.py",
        "--work-dir",
        tmp_path,
        "--prompts",
        "2",
        "--group",
        "4",
        "--new-tokens",
        "8",
        "--repeats",
        "1",
        "--breakdown",
        timeout=300,
    )
    for row in (
        "| megatron (Actor.policy_step) |",
        "| hf (transformers + AdamW + all-reduce) |",
        "| forward+backward |",
    ):
        assert row in out, out[-3000:]


@pytest.mark.slow
def test_rollout_benchmark_runs_both_generators(tmp_path):
    root = Path(__file__).resolve().parents[1]
    args = ["--prompts", "2", "--group", "2", "--new-tokens", "8", "--repeats", "1", "--work-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "rollout.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
        cwd=root,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for row in ("| vLLM (VLLMEngine.generate) |", "| HF transformers generate |"):
        assert row in proc.stdout, out[-3000:]
    assert "32 completion tokens" in proc.stdout  # 2 prompts x G=2 x 8 tokens, as asked


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_benchmark_runs_a_disaggregated_setting(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "async.py"), "--out", str(tmp_path), "--steps", "2"]
        + ["--prompts", "4", "--micro-batch", "4", "--max-new-tokens", "16", "--hidden", "128", "--layers", "2"]
        + ["--settings", "disagg s=1"],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| disagg s=1 |" in proc.stdout


@pytest.mark.slow
def test_async_projection_prints_every_split():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "async_model.py"), "--devices", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_cells = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [c for c in first_cells if c[0].isdigit()] == ["1 + 3", "2 + 2", "3 + 1"]


@pytest.mark.slow
def test_async_benchmark_checks_the_schedule_against_the_staleness_0_sides(tmp_path):
    """`--reuse` on hand-made metrics: 3 steps per run (the median is the middle one's). Colocated
    1.0 s; s=0 sides: generate 0.4, reward 0.01, train 0.3, sync 0.05 (0.76 s); s=1 measured 0.5 s.
    The schedule predicts s=1 at max(0.4, 0.31) + 0.05 = 0.45 s: 1/0.45 = 2.22x against 1/0.5 = 2.00x, +11%."""
    root = Path(__file__).resolve().parents[1]

    def row(rollout, reward, logprobs, update, sync, wait=0.0):
        return {
            "time/rollout": rollout,
            "time/reward": reward,
            "time/logprobs": logprobs,
            "time/update": update,
            "time/weight_sync": sync,
            "time/rollout_wait": wait,
            "cpu_time/logprobs": logprobs,
            "cpu_time/update": update,
            "sampling/prompts_sampled": 8,
            "len/mean": 10.0,
        }

    runs = {
        "colocated": row(0.5, 0.01, 0.1, 0.29, 0.1),  # 1.0 s
        "disagg_s0": row(0.4, 0.01, 0.1, 0.2, 0.05),  # 0.76 s
        "disagg_s1": row(0.0, 0.01, 0.1, 0.2, 0.05, wait=0.14),  # 0.5 s
    }
    for name, r in runs.items():
        (tmp_path / f"{name}_r0").mkdir()
        (tmp_path / f"{name}_r0" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for _ in range(3)) + "\n")
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "async.py"), "--out", str(tmp_path), "--reuse"]
        + ["--settings", "colocated", "disagg s=0", "disagg s=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "disagg s=1: predicted 2.22x, measured 2.00x (+11%, within 15%: True)" in proc.stdout, proc.stdout
    assert "disagg s=0: predicted 1.32x, measured 1.32x (" in proc.stdout, proc.stdout  # the same sum of phases
    # Identical steps: the per-step variant pairs equal times and predicts the same.
    variation = proc.stdout.split("step-to-step variation")[1]
    assert "disagg s=1: predicted 2.22x, measured 2.00x (+11%, within 15%: True)" in variation, proc.stdout
