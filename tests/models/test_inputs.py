"""Generated inputs named in a config (`tiny:qwen2`, `synthetic:arith`): deterministic, cached,
rank-safe, and validated like paths (`agpo check` accepts them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.data.inputs import resolve_dataset
from agpo_megatron.models.inputs import resolve_model
from agpo_megatron.plan.load import load_train_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_synthetic_rows_are_deterministic_cached_and_carry_levels(cache):
    path = Path(resolve_dataset("synthetic:arith?n=5&seed=3&max_difficulty=2"))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all(r["level"] == r["difficulty"] + 1 for r in rows)
    assert resolve_dataset("synthetic:arith?n=5&seed=3&max_difficulty=2") == str(path)  # cached, same entry
    other = Path(resolve_dataset("synthetic:arith?n=5&seed=4&max_difficulty=2"))
    assert other != path and other.read_text() != path.read_text()
    assert resolve_dataset("data/train.jsonl") == "data/train.jsonl"  # a real path passes through


@pytest.mark.slow
def test_concurrent_ranks_build_one_complete_entry(cache):
    # Four processes resolve the same spec at once, as the ranks of a job do before any process group.
    code = (
        "from agpo_megatron.data.inputs import resolve_dataset; print(resolve_dataset('synthetic:arith?n=300&seed=7'))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={"AGPO_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for _ in range(4)
    ]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outs) == 1
    assert len(Path(outs.pop()).read_text().splitlines()) == 300
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no half-written copies left


@pytest.mark.parametrize(
    "field, spec, needle",
    [
        ("model.hf_path", "tiny:gpt9", "unknown tiny model type"),
        ("data.train.path", "synthetic:calculus", "unknown synthetic task"),
        ("data.train.path", "synthetic:arith?n=ten", "n must be an integer"),
        ("data.eval.path", "synthetic:arith?size=3", "unknown parameter 'size'"),
        ("data.train.path", "synthetic:arith?max_difficulty=5", "max_difficulty in [0, 2]"),
    ],
)
def test_bad_specs_name_the_field(cache, field, spec, needle):
    with pytest.raises(ValueError) as e:  # a ConfigError naming the file once load_train_config wraps it
        (resolve_model if field.startswith("model") else resolve_dataset)(spec, field)
    assert field in str(e.value) and needle in str(e.value)


def test_tiny_cpu_example_validates_from_nothing(cache):
    cfg = load_train_config(ROOT / "examples" / "tiny_cpu.yaml")
    assert Path(cfg.model.hf_path, "config.json").is_file()
    assert Path(cfg.model.hf_path, "tokenizer", "tokenizer.json").is_file()
    assert Path(cfg.data.train.path).is_file() and Path(cfg.data.eval.path).is_file()
    assert cfg.check_world(2) == 2
    assert resolve_model("tiny:qwen2") == cfg.model.hf_path


@pytest.mark.slow
def test_a_tiny_model_written_by_rank1_is_complete(tmp_path):
    """transformers 5 saves only on torch.distributed rank 0; a `tiny:` model built by rank 1 (which
    took the cache lock first) held only its tokenizer, and the run failed with "no config.json"."""
    from tests.dist import torchrun

    torchrun("tiny_on_rank1.py", tmp_path, timeout=180)
    files = (tmp_path / "files.txt").read_text().split()
    assert "config.json" in files and "model.safetensors" in files, files
