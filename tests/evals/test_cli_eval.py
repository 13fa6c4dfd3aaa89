"""`agpo eval` and the shared evaluator: hand-worked metrics and tables, one-line input errors, and a
tiny model evaluated end to end as an HF folder and as a Megatron checkpoint (the same weights give
the same greedy numbers: the bridge streamed them in whole)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.evals.cli_eval import main as eval_main
from agpo_megatron.evals.cli_eval import tables
from agpo_megatron.evals.evaluate import summarize

ROOT = Path(__file__).resolve().parents[2]


def test_summarize_hand_worked():
    # 2 prompts x n=2: prompt 0 right once (10 and 20 tokens), prompt 1 wrong twice (30, 40; one truncated).
    rows = [
        (0, 1.0, 10, False, {"waste_tokens": 2.0}),
        (0, 0.0, 20, False, {"waste_tokens": 4.0}),
        (1, 0.0, 30, False, {"waste_tokens": 0.0}),
        (1, 0.0, 40, True, {"waste_tokens": 6.0}),
    ]
    out = summarize(rows, 2, level_of=[1, 3])
    assert out["pass@1"] == 0.25 and out["pass@2"] == 0.5
    assert out["mean_tokens"] == 25.0 and out["mean_tokens_correct"] == 10.0 and out["mean_tokens_wrong"] == 30.0
    assert out["truncated"] == 0.25 and out["waste_tokens"] == 3.0 and out["num_prompts"] == 2
    assert out["level1/pass@1"] == 0.5 and out["level1/mean_tokens"] == 15.0
    assert out["level3/pass@1"] == 0.0 and out["level3/mean_tokens"] == 35.0


def test_side_by_side_table_paper_layout():
    grpo = {"pass@1": 0.772, "pass@4": 0.9, "mean_tokens": 640.0, "mean_tokens_correct": 500.0}
    grpo |= {"mean_tokens_wrong": 900.0, "truncated": 0.01, "level1/pass@1": 0.95, "level1/mean_tokens": 400.0}
    agpo = {**grpo, "mean_tokens": 463.0, "level1/mean_tokens": 300.0, "pass@1": 0.762}
    md = tables({"GRPO": grpo, "AGPO": agpo}, 4)
    assert "| GRPO | 77.2 | 90.0 | 640 | 500 | 900 | 1.0% |" in md
    assert "| AGPO | 76.2 (-1.0) | 90.0 | 463 (-28%) |" in md  # 463 / 640 - 1 = -27.7%
    assert "| AGPO | 95.0 | 300 (-25%) | 76.2 | 463 (-28%) |" in md  # Level 1, then All


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        ("", ["--model", "nowhere"], "--model nowhere: no such file or directory"),
        ("model", ["--data", "missing.jsonl"], "missing.jsonl: no such file"),
        ("model+bad", ["--data", "bad.jsonl"], "bad.jsonl:2: malformed JSON"),
        ("model+data", ["--data", "data.jsonl", "--level-field", "subject"], "data.jsonl:1: no field 'subject'"),
        ("empty", ["--model", "empty"], "neither an HF model folder"),
    ],
)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, setup, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{oops\n')
    (tmp_path / "data.jsonl").write_text('{"problem": "1+1", "answer": "2", "level": 1}\n')
    argv = ["--model", "m", "--data", "data.jsonl"]
    for i in range(0, len(args), 2):  # the case's flags replace the defaults
        if args[i] in argv:
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i : i + 2]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agpo eval: error: ") and needle in err and "\n" not in err


@pytest.mark.slow
def test_agpo_eval_hf_folder_and_megatron_checkpoint(tmp_path):
    """One call, two models with the same weights: HF folder and its hf_to_megatron checkpoint."""
    from agpo_megatron.data import synthetic_steps
    from agpo_megatron.data.synthetic import write_jsonl
    from agpo_megatron.models.inputs import write_tiny_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    hf = write_tiny_model(tmp_path / "hf", "qwen2", seed=0)
    ckpt = tmp_path / "mcore"
    subprocess.run(
        [sys.executable, "-m", "checkpoints_conversion.hf_to_megatron", "--hf-dir", str(hf), "--out", str(ckpt)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    _, held = synthetic_steps.make_split(8, 6, seed=0)
    write_jsonl(held, tmp_path / "held.jsonl")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "agpo_megatron.cli", "eval", "--model", str(hf), "--model", str(ckpt)]
    cmd += ["--data", str(tmp_path / "held.jsonl"), "--prompt-field", "question", "--prompt-template", "{prompt}"]
    cmd += ["--n", "2", "--temperature", "1", "--max-new-tokens", "8", "--max-model-len", "128", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())["results"]
    a, b = res["hf"], res["mcore"]
    # A random model: the plumbing, not the accuracy. Every response is 8 tokens or ends at EOS.
    assert a["num_prompts"] == 6 and a["n"] == 2 and 0 < a["mean_tokens"] <= 8
    assert {"pass@1", "pass@2", "mean_tokens_wrong", "truncated", "level2/pass@1", "level3/mean_tokens"} <= set(a)
    for k in ("pass@1", "mean_tokens", "truncated", "level2/mean_tokens", "level3/mean_tokens"):
        assert a[k] == b[k], k  # same weights, same per-request seeds: identical, so the checkpoint loaded whole
    # The samples themselves: the same text, token for token, from the folder and from the checkpoint.
    texts = [[json.loads(line)["text"] for line in (out / "models" / f"{i}.responses.jsonl").open()] for i in (0, 1)]
    assert len(texts[0]) == 12 and texts[0] == texts[1]
    md = (out / "eval.md").read_text()
    assert "| hf |" in md and "| mcore |" in md and "Level 2 acc" in md and "(+0%)" in md
