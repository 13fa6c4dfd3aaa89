"""Staged outputs (bridge/output_dir.py), checksums (checkpoint/checksums.py) and the HF writer's refusal of
a folder that already holds weights: in-process, no process group."""

import hashlib
from pathlib import Path

import pytest
import torch

from agpo_megatron.bridge import output_dir
from agpo_megatron.bridge.hf_writer import HFCheckpointWriter, HFWriteError, TensorSpec
from agpo_megatron.checkpoint import CheckpointError, checksums


def fill(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


OLD = {
    "model-00001-of-00002.safetensors": "old1",
    "model-00002-of-00002.safetensors": "old2",
    "model.safetensors.index.json": "old index",
}


def test_non_empty_output_is_refused_naming_it(tmp_path):
    out = fill(tmp_path / "hf", OLD)
    with pytest.raises(CheckpointError, match=rf"^{out}: not empty; .* --overwrite"):
        with output_dir.staged(out, overwrite=False):
            pass
    assert contents(out) == OLD and [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwrite_replaces_the_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem without RENAME_EXCHANGE: rename aside, rename in, delete
        monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    out = fill(tmp_path / "hf", OLD)
    with output_dir.staged(out, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".hf.tmp-")
        fill(staging, {"model.safetensors": "new"})
        assert contents(out) == OLD  # untouched until the new folder is complete
    assert contents(out) == {"model.safetensors": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_a_failure_leaves_the_old_output_and_no_staging(tmp_path):
    out = fill(tmp_path / "hf", OLD)
    with pytest.raises(CheckpointError, match=r"/hf/model.safetensors: boom"):  # staging path renamed to out
        with output_dir.staged(out, overwrite=True) as staging:
            fill(staging, {"model.safetensors": "half"})
            raise CheckpointError(f"{staging / 'model.safetensors'}: boom")
    assert contents(out) == OLD and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_output_may_not_be_or_hold_the_input(tmp_path):
    src = fill(tmp_path / "ckpt", {"x": "1"})
    for out in (src, src / "export", tmp_path):
        with pytest.raises(CheckpointError, match="may not be, hold or sit inside the input"):
            output_dir.check_target(out, overwrite=True, inputs=(src,))


def test_output_under_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/f/out: cannot be created: {tmp_path}/f exists"):
        output_dir.check_target(tmp_path / "f" / "out", overwrite=False)


def test_hf_writer_refuses_a_folder_that_holds_weights(tmp_path):
    fill(tmp_path, OLD)
    with pytest.raises(HFWriteError, match=r"already holds weight files"):
        HFCheckpointWriter(tmp_path, [TensorSpec("t", (2,), torch.float32)])


def test_checksum_taken_while_writing_matches_the_file(tmp_path):
    f = tmp_path / "data"
    with open(f, "wb") as raw:
        w = checksums.HashingWriter(raw, "sha256")
        torch.save(torch.arange(1000.0), w)
        w.write(b"tail")
    assert w.entry() == {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert checksums.file_entry(f, "sha256") == w.entry()
    assert checksums.check(tmp_path, "data", w.entry(), "agpo_meta.json") is None


def test_checksum_problems_name_the_file(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(bytes(range(200)))
    entry = checksums.file_entry(f)
    f.write_bytes(bytes(range(199)) + b"\x00")
    assert checksums.check(tmp_path, "data", entry, "agpo_meta.json") == (
        f"{f}: checksum mismatch ({checksums.ALGO}): the file is corrupt or changed since it was saved; "
        "--no-verify loads it anyway"
    )
    f.write_bytes(bytes(range(100)))
    assert (
        checksums.check(tmp_path, "data", entry, "agpo_meta.json")
        == f"{f}: truncated: 100 bytes, agpo_meta.json records 200"
    )
    f.unlink()
    assert checksums.check(tmp_path, "data", entry, "agpo_meta.json") == f"{f}: missing (agpo_meta.json lists it)"


def test_symlinked_output_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(fill(tmp_path / "real", OLD))
    with pytest.raises(CheckpointError, match=r"/link: is a symbolic link"):
        output_dir.check_target(tmp_path / "link", overwrite=True)
