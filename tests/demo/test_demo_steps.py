"""A one-seed, shortened `agpo demo` on the steps task: the plumbing and the logged split of tokens
(never the effect, never the time)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_steps_demo_logs_the_token_split(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "agpo_megatron.cli", "demo", "--out", str(out), "--sft-steps", "4"]
    cmd += ["--n-train", "64", "--n-eval", "8", "steps=2", "batch.prompts_per_rollout=2", "algo.group_size=4"]
    cmd += ["batch.micro_batch_size=4"]
    proc = subprocess.run(cmd, env=env, timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "steps" and list(res["runs"]) == ["GRPO", "AGPO"]
    assert set(res["design"]["cells"]) == {f"steps={s},waste={w}" for s in (0, 1) for w in range(4)}
    for run in res["runs"].values():
        for when in ("eval_before", "eval_after"):
            ev = run[when]
            for mode, n in (("greedy", 1), ("sampled", 4)):
                assert ev[f"{mode}/n"] == n and ev[f"{mode}/num_prompts"] == 8
                split = sum(ev[f"{mode}/{k}"] for k in ("reasoning_tokens", "waste_tokens", "other_tokens"))
                # Every generated token (EOS included) is reasoning, waste or other.
                assert ev[f"{mode}/mean_tokens"] == pytest.approx(split)
                assert ev[f"{mode}/reasoning_tokens"] >= 0 and ev[f"{mode}/waste_tokens"] >= 0
    for arm in ("grpo", "agpo"):
        rows = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "task/waste_tokens" in r]
        assert len(steps) == 2
        for r in steps:
            split = r["task/reasoning_tokens"] + r["task/waste_tokens"] + r["task/other_tokens"]
            assert r["len/mean"] == pytest.approx(split) and 0 <= r["task/steps_present"] <= 1
    assert "Design check" in proc.stdout and "sampled (T=1.0, n=4)" in proc.stdout


@pytest.mark.slow
def test_waste_after_the_box_reaches_the_data_and_the_design_check(tmp_path):
    """`--waste-at after`: the training solutions carry their waste behind the box, and the design
    check forces the steps alone, so every waste level of a problem is one generation (effect 0)."""
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "agpo_megatron.cli", "demo", "--out", str(out), "--sft-steps", "4", "--design-only"]
    cmd += ["--waste-at", "after", "--n-train", "64", "--n-eval", "8"]
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    wasteful = [r for r in rows if r["waste"]]
    assert wasteful and all(r["solution"].endswith(" ".join(r["waste_text"])) for r in wasteful)
    design = json.loads((out / "design.json").read_text())
    for s in (0, 1):
        assert len({design["cells"][f"steps={s},waste={w}"] for w in range(4)}) == 1
    assert design["waste_effect"] == {"steps=1": 0.0, "steps=0": 0.0}
