"""`agpo check` and the start of `train` catch missing files and bad settings in one line (issue 11)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.cli import main
from agpo_megatron.data.synthetic import build_tokenizer
from agpo_megatron.models.tiny import tiny_hf_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    tiny_hf_config("qwen2", num_heads=4, num_kv_heads=2, num_layers=2).save_pretrained(d)
    build_tokenizer(d)
    return d


@pytest.fixture()
def cfg(tmp_path, hf_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(8))
    )
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"model: {{hf_path: {hf_dir}}}\n"
        f"data: {{train: {{path: {data}, answer_format: gsm8k, max_prompt_tokens: 512}}}}\n"
        f"logging: {{out_dir: {tmp_path / 'run'}}}\n"
        "rollout: {max_new_tokens: 64}\n"
        "algo: {group_size: 4}\nbatch: {prompts_per_rollout: 4, micro_batch_size: 4}\n"
    )
    return p


def _check(capsys, cfg, *overrides):
    rc = main(["check", "--config", str(cfg), *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_good_config_reports_its_data(capsys, cfg):
    rc, out, err = _check(capsys, cfg, "optim.lr=1e-6", "--world-size", "2")
    assert rc == 0, err
    assert "data.train" in out and "8 of 8 prompts kept" in out and "ok: world 2" in out


def test_check_shows_a_disaggregated_split(capsys, cfg):
    split = ["rollout.placement=disaggregated", "rollout.num_ranks=2", "--world-size", "3"]
    rc, out, err = _check(capsys, cfg, *split)
    assert rc == 0, err
    assert "ok: world 3 = 1 trainer ranks (tp 1 x pp 1 x dp 1) + 2 rollout ranks (2 vLLM replicas at tp 1)" in out


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.train.path=/nowhere/train.jsonl", "data.train.path='/nowhere/train.jsonl': no such file"),
        ("model.hf_path=", "model.hf_path is empty"),
        ("data.reward_timeout_s=-1", "data.reward_timeout_s must be > 0"),
        ("data.reward_step_budget_s=0", "data.reward_step_budget_s must be > 0"),
        ("data.train.max_prompt_tokens=5", "data.train (.*): 0 of 8 prompts kept; dropped 8 longer"),
        ("model.init_from=megatron", "checkpoint.load_dir"),
        # issue 20: a float the optimizer's fp32 cannot hold; an override is blamed, not the file
        ("optim.lr=1e39", r"override 'optim.lr=1e39': optim.lr=1e\+39 overflows float32"),
        ("optim.clip_grad=.inf", "override 'optim.clip_grad=.inf': optim.clip_grad=inf overflows float32"),
        ("optim.lrr=1e-5", r"override 'optim.lrr=1e-5': unknown config field\(s\) \['optim.lrr'\]"),
    ],
)
def test_bad_settings_fail_in_one_line(capsys, cfg, override, needle):
    import re

    rc, out, err = _check(capsys, cfg, override)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agpo check: error:"), err
    assert re.search(needle, lines[0]), lines[0]


def test_unwritable_save_dir_is_found_before_training(capsys, cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, _, err = _check(capsys, cfg, f"checkpoint.save_dir={blocker / 'ckpt'}")
    assert rc == 2 and "checkpoint.save_dir=" in err and "is not writable" in err


@pytest.mark.slow
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_debug_shows_the_traceback(cfg, before):
    """`--debug` before the subcommand and after it (issue 20)."""
    args = ["check", "--config", str(cfg), "data.reward_timeout_s=-1"]
    proc = subprocess.run(
        [sys.executable, "-m", "agpo_megatron.cli", *(["--debug", *args] if before else [*args, "--debug"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "reward_timeout_s" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_train_routes_library_logs_to_a_file_unless_verbose(cfg, tmp_path, verbose):
    """Issue 20: `agpo train` (one process here) sends library output to out_dir/logs/rank0.log and keeps
    its own lines on the console; `--verbose` leaves everything on the console. The error comes from
    the start of training (the data file is checked there), after the routing."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agpo_megatron.cli",
            "train",
            *(["--verbose"] if verbose else []),
            "--config",
            str(cfg),
            "data.train.path=/nowhere/train.jsonl",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    console = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in console if line.startswith("agpo train: error:")]
    assert len(errors) == 1 and "data.train.path='/nowhere/train.jsonl'" in errors[0]
    assert (out / "logs" / "rank0.log").is_file() != verbose
    if not verbose:
        assert len(console) <= 3, console  # the config's warning and the error, no library output
