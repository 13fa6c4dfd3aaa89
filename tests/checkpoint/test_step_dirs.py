"""The step-folder commit protocol on its own (no torch.distributed): atomic commit, `latest`,
keep_last, stale-folder cleanup, and a SIGKILL at each named point of a commit."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agpo_megatron.checkpoint import step_dirs
from agpo_megatron.config.schema import CheckpointConfig
from agpo_megatron.config.yaml_io import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write_step(save_dir: Path, step: int, payload: str = "x") -> Path:
    """What a save writes before the commit: data files, then the marker last."""
    tmp = save_dir / step_dirs.tmp_name(step_dirs.step_name(step))
    (tmp / "rng").mkdir(parents=True)
    (tmp / "__0_0.distcp").write_text(payload)
    (tmp / step_dirs.COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    step_dirs.fsync_tree(tmp)
    return tmp


def test_commit_renames_then_publishes_latest(tmp_path):
    for step in (1, 2):
        final = step_dirs.commit(_write_step(tmp_path, step), step)
        assert final == tmp_path / f"step_00000{step}"
        assert step_dirs.read_latest(tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert step_dirs.newest_complete(tmp_path) == tmp_path / "step_000002"


def test_a_step_folder_is_never_written_into_again(tmp_path):
    step_dirs.commit(_write_step(tmp_path, 1, "first"), 1)
    with pytest.raises(FileExistsError, match="never written into again"):
        step_dirs.commit(_write_step(tmp_path, 1, "second"), 1)
    assert (tmp_path / "step_000001" / "__0_0.distcp").read_text() == "first"


def test_an_incomplete_folder_is_not_committed(tmp_path):
    tmp = _write_step(tmp_path, 1)
    (tmp / step_dirs.COMPLETE_MARKER).unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        step_dirs.commit(tmp, 1)
    assert not (tmp_path / "step_000001").exists()


def test_keep_last_deletes_only_older_complete_steps(tmp_path):
    for step in (1, 2, 3, 4):
        step_dirs.commit(_write_step(tmp_path, step), step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert step_dirs.read_latest(tmp_path).name == "step_000004"


def test_clean_stale_and_newest_complete_ignore_unfinished_saves(tmp_path):
    step_dirs.commit(_write_step(tmp_path, 1), 1)
    _write_step(tmp_path, 2)  # killed before the rename
    (tmp_path / "step_000003").mkdir()  # not made by a commit: no marker
    assert step_dirs.newest_complete(tmp_path).name == "step_000001"
    removed = step_dirs.clean_stale(tmp_path)
    assert len(removed) == 1 and removed[0].startswith(".tmp-step_000002-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000003"]


def test_write_atomic_and_replace_folder(tmp_path):
    step_dirs.write_atomic(tmp_path / "f", "a")
    step_dirs.write_atomic(tmp_path / "f", "b")
    assert (tmp_path / "f").read_text() == "b" and [p.name for p in tmp_path.iterdir()] == ["f"]
    for payload in ("old", "new"):
        tmp = _write_step(tmp_path, 0, payload)
        step_dirs.replace_folder(tmp, tmp_path / step_dirs.INITIAL)
    assert (tmp_path / step_dirs.INITIAL / "__0_0.distcp").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", step_dirs.INITIAL]


_COMMITTER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.checkpoint.test_step_dirs import _write_step
from agpo_megatron.checkpoint import step_dirs
d = Path(sys.argv[1])
for step in (1, 2):
    step_dirs.commit(_write_step(d, step), step, keep_last=1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_rename", "before_latest", "after_latest"])
def test_sigkill_during_a_commit_leaves_a_loadable_previous_step(tmp_path, point):
    proc = subprocess.run(
        [sys.executable, "-c", _COMMITTER.format(root=str(ROOT)), str(tmp_path)],
        env={**os.environ, step_dirs.KILL_ENV: f"{point}:2"},
        timeout=60,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    if point == "after_latest":  # killed before keep_last pruned step 1
        assert step_dirs.read_latest(tmp_path).name == "step_000002"
        assert (tmp_path / "step_000001").is_dir()
        return
    assert step_dirs.read_latest(tmp_path).name == "step_000001"
    assert step_dirs.is_complete(tmp_path / "step_000001")
    # After the rename the newer folder is complete, and the next start takes it (and repairs `latest`).
    expect = "step_000002" if point == "before_latest" else "step_000001"
    assert step_dirs.newest_complete(tmp_path).name == expect


def test_kill_hook_rejects_a_bad_spec(monkeypatch):
    monkeypatch.setenv(step_dirs.KILL_ENV, "nowhere:2")
    with pytest.raises(ValueError, match="AGPO_CKPT_KILL_AT"):
        step_dirs.kill_point("shards", 2)


def test_checkpoint_config_resume_and_keep_last(tmp_path):
    assert CheckpointConfig().resume == "auto"
    assert CheckpointConfig(resume=str(tmp_path)).resume == str(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        CheckpointConfig(resume=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="checkpoint.keep_last"):
        CheckpointConfig(keep_last=-1)


def test_preempt_signal_sets_the_flag():
    from agpo_megatron.runtime import preempt

    preempt.install()
    try:
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested()
    finally:
        preempt.reset()
        for sig in preempt.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    assert preempt.EXIT_PREEMPTED == 75
