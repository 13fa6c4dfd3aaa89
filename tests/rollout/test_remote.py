"""The trainer <-> rollout link (runtime/placement.py, rollout/remote.py) on 3 CPU ranks: 2 trainer
ranks (their own world of 2) and 1 rollout rank with a fake engine."""

import json
import os
import subprocess

import pytest
import torch

from agpo_megatron.rollout.remote import RemoteRollout
from agpo_megatron.rollout.replicas import request_seed
from agpo_megatron.runtime.parallel import torchrun_cmd
from agpo_megatron.runtime.placement import side_of
from tests.dist import WORKERS, torchrun


def test_the_last_ranks_roll_out():
    assert [side_of(r, 5, 2) for r in range(5)] == [
        ("trainer", 0, 3),
        ("trainer", 1, 3),
        ("trainer", 2, 3),
        ("rollout", 0, 2),
        ("rollout", 1, 2),
    ]
    with pytest.raises(ValueError, match="must be in"):
        side_of(0, 2, 2)


def test_a_remote_engine_on_one_rank_needs_no_link():
    # A trainer rank that is not the leader holds no link: it pulls the weight stream (collective) and
    # sends nothing; its state follows the leader's.
    remote = RemoteRollout(None)
    pulled = []
    remote.update_weights(pulled.append(t) or (n, t) for n, t in [("x", torch.ones(1))])
    assert len(pulled) == 1 and remote.pushed_version == 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_weights_arrive_bit_exact_with_their_version_and_completions_carry_it(tmp_path):
    torchrun("remote_rollout.py", str(tmp_path), "ok", nproc=3, timeout=180)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(3)]
    assert [(x["role"], x["side_rank"], x["side_world"]) for x in r] == [
        ("trainer", 0, 2),
        ("trainer", 1, 2),
        ("rollout", 0, 1),
    ]
    # Both trainer ranks get the same completions, tagged with the version that sampled them.
    assert r[0]["first"] == r[1]["first"] == [[[1, 2, 11], 0], [[3, 11], 0]]
    assert r[0]["second"] == r[1]["second"] == [[[4, 4, 12], 1]]
    # Versions 0 and 1 arrived once each (the repeated version 1 sent nothing), every value exact
    # (bf16 and int64 included), in several 64-byte buckets.
    loads = r[2]["loads"]
    assert len(loads) == 2
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 5, generator=g)
    b = torch.randn(7, generator=g)
    assert loads[1]["a.weight"] == ["torch.float32", [3, 5], (a * 2).flatten().tolist()]
    assert loads[1]["b.weight"] == ["torch.bfloat16", [7], (b * 2).to(torch.bfloat16).float().tolist()]
    assert loads[0]["c.bias"] == ["torch.int64", [4], [0.0, 1.0, 2.0, 3.0]]
    assert list(loads[0]) == ["a.weight", "b.weight", "c.bias", "d.weight"]
    # A weight sync while a request is unanswered would interleave on the link: refused.
    assert "while a request is unanswered" in r[0]["refused"]
    # A partial request: prompt [7] ends in its first segment and is answered, at version 1; prompt [8]
    # stays unfinished in the rollout rank's pool.
    seed = request_seed(5, 0, 1)
    partial = [[["k0", [[[seed % 97], [1], [-0.5]]]]], {"segments": 1.0, "carried_groups": 1.0, "ready_groups": 0.0}]
    assert r[0]["partial"] == r[1]["partial"] == partial
    assert r[2]["served"] == 5  # weights, generate, weights, generate, partial (then stop)


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["dead", "hung"])
def test_a_dead_or_hung_rollout_rank_fails_the_trainer_in_one_line_naming_it(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        torchrun_cmd(3, str(WORKERS / "remote_rollout.py"), str(tmp_path), mode),
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode != 0  # the rollout rank died: torchrun reports the job failed
    err = json.loads((tmp_path / "rank0.json").read_text())["error"]
    assert err is not None and "\n" not in err
    assert "world rank(s) [2] failed: a dead rollout rank, or a hung one (silent for over 5 s)" in err
    # A dead peer closes its sockets: the trainer hears of it at once; a hung one after the link's step
    # timeout (5 s here), not the start-up one (60 s) nor the rollout rank's 120 s sleep.
    assert json.loads((tmp_path / "rank0.json").read_text())["waited_s"] < 40
