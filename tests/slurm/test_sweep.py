"""examples/sweeps/paper_ablation.py: every task's overrides form a valid config, and the tiny sweep
runs through nemo-run's SlurmExecutor + LocalTunnel on a real (local) Slurm cluster."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from agpo_megatron.models.tiny import tiny_hf_config
from agpo_megatron.plan.load import load_train_config

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "examples" / "sweeps" / "paper_ablation.py"
LAUNCH_PYTHON = os.environ.get("AGPO_LAUNCH_PYTHON", str(ROOT / ".venv-launch" / "bin" / "python"))
SLURM_CONF = os.environ.get("AGPO_SLURM_CONF", "")


def _sweep_module():
    spec = importlib.util.spec_from_file_location("paper_ablation", SWEEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports nemo_run only inside main(), so this works without it
    return mod


def test_every_task_is_a_valid_config_of_the_paper_setting(tmp_path):
    sweep = _sweep_module()
    tiny_hf_config("qwen2", num_heads=4, num_kv_heads=2, num_layers=2).save_pretrained(tmp_path)
    args = sweep.parse_args(["--out", str(tmp_path / "out")])
    tasks = sweep.task_list(args)
    assert len(tasks) == 20 and {"grpo", "agpo-m1", "agpo", "agrpo-noclip", "agrpo-G16"} <= set(tasks)
    assert {"dapo", "gspo", "rloo", "drgrpo"} <= set(tasks)
    cfgs = {}
    for name, overrides in tasks.items():
        cfgs[name] = load_train_config(
            ROOT / "examples" / "agpo_qwen7b.yaml", [*overrides, f"model.hf_path={tmp_path}"]
        )
        cfgs[name].check_world(8)
        assert cfgs[name].logging.out_dir == f"{tmp_path}/out/{name}"
    assert (cfgs["grpo"].algo.advantage, cfgs["grpo"].algo.length_reward) == ("grpo", False)
    assert (cfgs["agpo-m1"].algo.advantage, cfgs["agpo-m1"].algo.length_reward) == ("agpo", False)
    assert cfgs["agpo"].algo.length_reward and cfgs["agpo-gamma0.05"].algo.gamma == 0.05
    assert cfgs["agrpo-nokl"].algo.loss.kl_coef == 0 and cfgs["agrpo-nokl"].algo.adaptive_kl_target is None
    assert cfgs["agrpo-beta1.0"].algo.loss.kl_coef == 1.0 and cfgs["agrpo-eps0.5"].algo.loss.eps_low == 0.5
    assert cfgs["agrpo-noentropy"].algo.loss.entropy_coef == 0 and cfgs["agrpo"].algo.loss.entropy_coef > 0
    assert [cfgs[f"agrpo-G{g}"].algo.group_size for g in (4, 8, 16)] == [4, 8, 16]
    tiny = sweep.task_list(sweep.parse_args(["--tiny"]))
    assert list(tiny) == ["grpo", "agpo-m1", "agpo"] and all("steps=2" in o for o in tiny.values())
    # The baselines (issue 22): each arm is its method on this base config.
    assert cfgs["dapo"].algo.dynamic_sampling.enabled and cfgs["dapo"].algo.overlong.soft_punishment
    assert (cfgs["dapo"].algo.loss.eps_low, cfgs["dapo"].algo.loss.eps_high) == (0.2, 0.28)
    assert cfgs["dapo"].algo.overlong.buffer_tokens == 600  # a fifth of the preset's 3000
    assert (cfgs["gspo"].algo.loss.ratio_level, cfgs["gspo"].algo.loss.eps_high) == ("sequence", 4e-4)
    assert cfgs["rloo"].algo.advantage == "rloo" and not cfgs["rloo"].algo.length_reward
    assert cfgs["drgrpo"].algo.loss.norm_tokens == 3000
    picked = sweep.task_list(sweep.parse_args(["--tiny", "--arms", "grpo,agpo,dapo"]))
    assert list(picked) == ["grpo", "agpo", "dapo"]
    with pytest.raises(SystemExit, match="unknown arm 'ppo'"):
        sweep.task_list(sweep.parse_args(["--arms", "grpo,ppo"]))


def _run_sweep(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    # NOTE: NEMORUN_HOME is not ".../nemo_run": nemo-run 0.11.1 rewrites "/nemo_run" in a Slurm job's paths.
    env = {
        **os.environ,
        "SLURM_CONF": SLURM_CONF,
        "NEMORUN_HOME": str(tmp_path / "nemorun_home"),
        "AGPO_CACHE_DIR": str(tmp_path / "cache"),
        # No slurmdbd on the local cluster: scripts/sacct answers nemo-run's status queries.
        "PATH": f"{ROOT / 'scripts'}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [
        LAUNCH_PYTHON,
        str(SWEEP),
        "--executor",
        "slurm",
        "--tiny",
        "--gpus-per-node",
        "0",
        "--out",
        str(tmp_path / "out"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


no_cluster = pytest.mark.skipif(
    not SLURM_CONF,
    reason="no Slurm cluster: run `scripts/slurm_local.sh start ROOT` "
    "and export AGPO_SLURM_CONF=ROOT/etc/slurm.conf (.ci/run does)",
)
no_nemo_run = pytest.mark.skipif(
    not os.access(LAUNCH_PYTHON, os.X_OK),
    reason=f"no nemo-run venv at {LAUNCH_PYTHON} (scripts/setup_cpu.sh makes .venv-launch)",
)


@pytest.mark.slow
@no_cluster
@no_nemo_run
@pytest.mark.timeout(900)
def test_tiny_sweep_on_slurm_runs_every_task_and_compares(tmp_path):
    proc = _run_sweep(tmp_path, timeout=880)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "tasks: grpo SUCCEEDED, agpo-m1 SUCCEEDED, agpo SUCCEEDED" in proc.stdout
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| grpo", "| agpo-m1", "| agpo"]
    assert all(row.split(" | ")[1] == "2" for row in table[2:])  # steps
    assert (tmp_path / "out" / "compare.png").is_file()


@pytest.mark.slow
@no_cluster
@no_nemo_run
@pytest.mark.timeout(600)
def test_a_failed_task_makes_the_sweep_exit_nonzero(tmp_path):
    # --retries 0: nemo-run would otherwise requeue the failed job (Slurm holds a requeued job ~2 min).
    proc = _run_sweep(tmp_path, "algo.gamma=oops", "--only", "agpo", "--retries", "0", timeout=580)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    assert "sweep failed: 1 of 1 task(s) did not succeed" in proc.stderr
