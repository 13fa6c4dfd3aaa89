"""End to end on CPU, world size 2: warm-start, then 2 RL steps with vLLM rollouts, Megatron updates
and weight syncs, through the same entry point as the demo."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.report.jsonl import read_jsonl
from tests.dist import torchrun_cmd

ROOT = Path(__file__).resolve().parents[2]

REQUIRED = [
    "reward/mean",
    "acc/mean",
    "len/mean",
    "len/max",
    "len/correct_mean",
    "adv/frac_uniform_groups",
    "adv/adv_mean",
    "train/pg_loss",
    "train/pg_clipfrac",
    "train/approx_kl",
    "train/entropy",
    "train/grad_norm",
    "time/rollout",
    "time/reward",
    "time/logprobs",
    "time/update",
    "time/weight_sync",
    "throughput/rollout_tokens_per_s",
    "throughput/train_tokens_per_s",
]


def _demo(out: Path, *overrides: str) -> dict:
    cmd = torchrun_cmd(
        2,
        "-m",
        "agpo_megatron.demo.run",
        "--config",  # explicit: independent of where the demo looks for its default
        str(ROOT / "examples" / "demo_cpu.yaml"),
        "--out",
        str(out),
        "--no-baseline",
        "--sft-steps",
        "3",
        "--n-train",
        "64",
        "--n-eval",
        "8",
        "--sft-batch",
        "8",
        "steps=2",
        "batch.prompts_per_rollout=4",
        "algo.group_size=4",
        "batch.micro_batch_size=4",
        "rollout.max_new_tokens=24",
        "logging.progress_bar=false",
        *overrides,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / "results.json").read_text())["runs"]["AGPO"]


def _check_run(out: Path, results: dict) -> list[dict]:
    rows = read_jsonl(out / "agpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["train/grad_norm"] > 0 and math.isfinite(r["train/pg_loss"])
        assert 0 <= r["acc/mean"] <= 1 and r["len/mean"] > 0
    for key in ("eval_before", "eval_after"):
        # the demo evaluates greedy and sampled (demo/run.py EVAL_MODES): keys carry the mode
        assert results[key]["greedy/num_prompts"] == 8 and 0 <= results[key]["greedy/pass@1"] <= 1
        assert results[key]["sampled/n"] == 4 and 0 <= results[key]["sampled/pass@1"] <= 1
    return rows


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_agpo_dp2_reference_loss_path_checkpoint_to_hf(tmp_path):
    # 2 mini-batches per rollout (issue 10), each split over the DP=2 ranks
    results = _demo(
        tmp_path,
        "algo.fused_loss=false",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=1",
        "batch.prompts_per_update=2",
    )
    rows = _check_run(tmp_path, results)
    assert "len_reward/len_reward_mean" in rows[0]  # m2 is on in the AGPO preset
    assert all(r["train/num_updates"] == 2 and r["train/approx_kl_off_policy"] >= 0 for r in rows)

    # The trainer's checkpoints are the converter's format: export the last one back to HF.
    ckpt = tmp_path / "ckpt" / "agpo"  # the demo gives each arm its own save_dir
    saved = sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("."))  # the run lock's file aside
    assert saved == ["latest", "step_000001", "step_000002"]
    hf_out = tmp_path / "hf_out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_conversion.megatron_to_hf",
            "--ckpt",
            str(ckpt / "step_000002"),
            "--out",
            str(hf_out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32)
    start = load_file(tmp_path / "model" / "model.safetensors")
    trained = dict(model.named_parameters())
    moved = [n for n, t in start.items() if not torch.equal(trained[n].detach(), t)]
    assert moved, "the exported checkpoint equals the random init: training or saving lost the updates"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_tp2_fused_loss_reference_kl_adaptive_tis_dynamic_batch_offload(tmp_path):
    results = _demo(
        tmp_path,
        "parallel.tp=2",
        "rollout.tp=2",
        "algo.loss.kl_coef=0.01",
        "algo.loss.kl_estimator=symmetric",
        "algo.loss.entropy_coef=0.001",
        "algo.adaptive_kl_target=0.01",
        "algo.adaptive_clip=true",
        "batch.prompts_per_update=2",  # adaptive eps_t needs off-policy updates (issue 10)
        # TIS needs the engine's log-probs next to recomputed old ones (logprob_mode=rollout is refused)
        "rollout.logprob_mode=recompute",
        "algo.loss.tis_cap=2.0",
        "batch.max_tokens_per_micro_batch=256",
        "algo.advantage=grpo",
        "algo.length_reward=false",
        # Host offload runs host -> host on CPU: the same code path as on GPU, so a read of
        # offloaded state during rollout would crash here.
        "offload.params=true",
        "offload.grads=true",
        "offload.optimizer=true",
        "offload.reference=true",
    )
    rows = _check_run(tmp_path, results)
    assert all("train/kl_ref" in r and r["train/kl_ref"] >= 0 for r in rows)
    assert all("train/tis_weight_mean" in r and r["train/rc_weight_max"] >= r["train/tis_weight_mean"] for r in rows)
    assert rows[1]["train/kl_coef"] != rows[0]["train/kl_coef"]  # beta_t adapted after step 1


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_dapo_dynamic_sampling_rounds_and_overlong_punishment_dp2(tmp_path):
    """Issue 22 through the real loop: DAPO's rounds with vLLM awake between them, the overlong
    punishment and filter. After 3 SFT steps the tiny model may solve nothing, so a step can keep no group:
    it then makes no update and says so (the group arithmetic itself: tests/train/test_rollout_rounds.py)."""
    results = _demo(
        tmp_path,
        "algo.advantage=grpo",
        "algo.length_reward=false",
        "algo.dynamic_sampling.enabled=true",
        "algo.dynamic_sampling.max_rollout_rounds=3",
        "algo.overlong.soft_punishment=true",
        "algo.overlong.filter=true",
        "batch.prompts_per_update=2",
    )
    rows = read_jsonl(tmp_path / "agpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        s = {k.removeprefix("sampling/"): v for k, v in r.items() if k.startswith("sampling/")}
        assert 1 <= s["rounds"] <= 3 and s["prompts_sampled"] == 4 * s["rounds"]
        assert s["groups_kept"] in (0, 2, 4) and s["short_batch"] == float(s["groups_kept"] < 4)
        assert s["rounds"] == 3 or s["groups_kept"] == 4  # stops early only when the batch is full
        assert "overlong/frac_overlong_punished" in r
        if s["groups_kept"]:  # every kept group is mixed: none has a zero GRPO advantage
            assert r["adv/frac_uniform_groups"] == 0 and math.isfinite(r["train/pg_loss"])
        assert r["train/num_updates"] == s["groups_kept"] // 2
    assert results["eval_after"]["greedy/num_prompts"] == 8


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_gspo_fused_with_overlong_punishment_dp2(tmp_path):
    """GSPO's sequence ratio in the fused loss inside the loop (off-policy updates, so the clip can act),
    with the overlong punishment; the entropy bonus keeps the gradient nonzero whatever the rewards."""
    results = _demo(
        tmp_path,
        "algo.advantage=grpo",
        "algo.length_reward=false",
        "algo.loss.ratio_level=sequence",
        "algo.loss.agg_mode=seq-mean-token-mean",
        "algo.overlong.soft_punishment=true",
        "algo.loss.entropy_coef=0.001",
        "batch.prompts_per_update=2",
    )
    rows = _check_run(tmp_path, results)
    assert all(r["train/num_updates"] == 2 and r["sampling/rounds"] == 1 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_qwen3_moe_ep2_routing_replay_r2(tmp_path, monkeypatch):
    """Issue 23 through the real loop: the tiny Qwen3-MoE (8 experts, top-2) with expert parallelism
    over the 2 ranks, vLLM rollouts synced from EP-sharded experts, the load-balancing loss, and r2
    routing replay (the 2nd mini-batch of a rollout replays its old-log-prob forward's routing)."""
    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path / "cache"))  # tiny:qwen3_moe built by the ranks
    results = _demo(
        tmp_path,
        "model.hf_path=tiny:qwen3_moe",
        "parallel.ep=2",
        "batch.packing=false",  # EP: one micro-batch shape on every rank
        "model.moe_aux_loss_coef=0.01",
        "algo.routing_replay=r2",
        "batch.prompts_per_update=2",
    )
    rows = _check_run(tmp_path, results)
    for r in rows:
        assert r["train/num_updates"] == 2
        # A load-balancing loss of 1 is perfect balance; top-2 of 8 can only go above it.
        assert r["train/moe_aux_loss"] >= 1.0 - 1e-6
        assert 0 <= r["train/moe_routing_mismatch"] <= 1
