"""Conversion reliability (issue 11): outputs appear whole, never mix with an earlier output,
never land in a trained checkpoint; corrupt, truncated and unwritable files are one line naming
the file, and the CLIs exit 2.

One 1-rank worker (tests/workers/conversion_reliability.py) runs every scenario in-process and
records exit codes and stderr; the kill -9 tests run the CLIs as subprocesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def hf(work) -> Path:
    return save_tiny_hf_model(work / "src", "qwen2", **TINY)


@pytest.fixture(scope="module")
def r(work, hf) -> dict:
    torchrun("conversion_reliability.py", work / "out", hf, nproc=1, timeout=300)
    return json.loads((work / "out" / "results.json").read_text())


def error_line(run: dict, prog: str) -> str:
    """The run failed with exit 2 and exactly one line of report, no traceback."""
    assert run["rc"] == 2, run
    lines = [ln for ln in run["err"].splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in run["err"], run["err"]
    return lines[0]


@pytest.mark.slow
def test_reexport_into_a_sharded_export_is_refused_without_overwrite(r):
    assert r["m2h_sharded"]["rc"] == 0
    line = error_line(r["reexport"], "megatron_to_hf")
    assert "/export: not empty" in line and "--overwrite" in line
    assert r["reexport_left_untouched"]


@pytest.mark.slow
def test_reexport_with_overwrite_leaves_no_stale_shard_or_index(r):
    assert r["reexport_overwrite"]["rc"] == 0, r["reexport_overwrite"]
    assert r["overwritten_files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert r["overwritten_reader_dtype"] == "BF16"  # HFCheckpointReader reads the new (bf16) export
    assert r["parent_leftovers"] == []  # no staging or old folder left beside it


@pytest.mark.slow
def test_hf_to_megatron_refuses_a_trained_checkpoint(r):
    assert r["trained_optimizer_keys"] > 0
    line = error_line(r["into_trained"], "hf_to_megatron")
    assert "/trained: not empty (it holds a Megatron checkpoint, step 3, source trainer;" in line
    assert r["trained_left_untouched"]


@pytest.mark.slow
def test_hf_to_megatron_overwrite_replaces_the_checkpoint_whole(r):
    assert r["into_trained_overwrite"]["rc"] == 0, r["into_trained_overwrite"]
    assert r["overwritten_optimizer_keys"] == 0  # no old optimizer state beside the new weights
    assert r["overwritten_meta"] == ["hf", 0]


@pytest.mark.slow
def test_every_checkpoint_file_has_a_checksum(r):
    assert r["h2m"]["rc"] == 0
    assert r["mcore_checksums"] == [f for f in r["mcore_files"] if f != "agpo_meta.json"]


@pytest.mark.slow
def test_flipped_bit_is_one_line_naming_the_file_and_no_verify_skips_it(r):
    line = error_line(r["flip"], "megatron_to_hf")
    assert f"/flipped/{r['flipped_file']}: checksum mismatch" in line
    assert not r["flip_export_exists"]
    assert r["flip_noverify"]["rc"] == 0, r["flip_noverify"]
    assert len(r["flip_noverify_changed"]) == 1  # unverified, the flipped bit reaches the export
    assert r["flip_load"].startswith("CheckpointError: ") and "\n" not in r["flip_load"]
    assert f"/flipped/{r['flipped_file']}: checksum mismatch" in r["flip_load"]
    assert r["flip_load_noverify"] == ""


@pytest.mark.slow
def test_truncated_file_is_one_line_naming_the_file(r):
    assert "/trunc/__0_0.distcp: truncated: " in error_line(r["trunc"], "megatron_to_hf")
    assert "/trunc/__0_0.distcp: truncated: " in error_line(r["trunc_noverify"], "megatron_to_hf")
    # The trainer's loader (Megatron's reader): was `CheckpointException ... BadZipFile`.
    assert (
        r["trunc_load_noverify"].startswith("CheckpointError: ")
        and "/trunc/__0_0.distcp: truncated" in r["trunc_load_noverify"]
    )


@pytest.mark.slow
def test_checkpoint_without_checksums_loads_with_a_note(r):
    assert r["old"]["rc"] == 0, r["old"]
    notes = [ln for ln in r["old"]["err"].splitlines() if "without checksum verification" in ln]
    assert len(notes) == 1 and "/old:" in notes[0]
    assert r["old_load"].startswith("(stderr) note: ") and r["old_load"].count("\n") == 1


@pytest.mark.slow
def test_unwritable_output_is_one_line_naming_it(r):
    assert "/afile/hf: cannot be created: " in error_line(r["under_file_m2h"], "megatron_to_hf")
    assert "/afile/mcore: cannot be created: " in error_line(r["under_file_h2m"], "hf_to_megatron")


@pytest.mark.slow
def test_failed_write_names_the_file_and_the_cause(r):
    # Was `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598`.
    assert "/big/__0_0.distcp: cannot write: File too large" in error_line(r["efbig_h2m"], "hf_to_megatron")
    assert (
        r["efbig_save"].startswith("CheckpointError: ")
        and "/big_save/__0_0.distcp: cannot write: File too large" in r["efbig_save"]
    )
    assert not r["efbig_out_exists"] and r["final_leftovers"] == []


def killed_cli(module: str, *args, at: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "AGPO_TEST_KILL_AT": at,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=180, env=env
    )


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_kill_9_during_an_export_leaves_the_previous_export_intact(r, work):
    out = work / "out"
    target = out / "export_sharded"
    before = snapshot(target)
    # Killed right after the first shard of the new export is complete.
    proc = killed_cli(
        "checkpoints_conversion.megatron_to_hf",
        "--ckpt",
        out / "mcore",
        "--out",
        target,
        "--max-shard-bytes",
        20_000,
        "--dtype",
        "bfloat16",
        "--overwrite",
        at="hf_writer:shard",
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert snapshot(target) == before
    staged = list(out.glob(".export_sharded.tmp-*"))
    assert len(staged) == 1 and len(list(staged[0].glob("*.safetensors"))) == 1  # it did get that far


@pytest.mark.slow
def test_kill_9_before_commit_leaves_the_previous_checkpoint_intact(r, work):
    out = work / "out"
    before = snapshot(out / "mcore")
    # Killed with the new checkpoint complete and fsynced, just before it is renamed into place.
    proc = killed_cli(
        "checkpoints_conversion.hf_to_megatron",
        "--hf-dir",
        work / "src",
        "--out",
        out / "mcore",
        "--overwrite",
        at="commit",
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert snapshot(out / "mcore") == before
    assert len(list(out.glob(".mcore.tmp-*"))) == 1
