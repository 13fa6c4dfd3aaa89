"""score_distributed: one reward per sample, the same on every rank (issue 10.3)."""

import json

import pytest

from agpo_megatron.data.answer_match import RewardResult, score_batch
from agpo_megatron.data.reward_dist import score_distributed
from tests.dist import torchrun


def test_world_of_one_matches_score_batch():
    texts = ["#### 7", "no answer", r"\boxed{3}", r"\boxed{1,234}"]
    golds = ["7", "1", "4", "1234"]
    got = score_distributed(texts, golds)
    want = score_batch(texts, golds)
    assert got[0].tolist() == want[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert got[1].tolist() == want[1].tolist()
    assert got[2] == want[2]


def test_score_fn_must_answer_every_sample():
    with pytest.raises(ValueError, match="returned 1 results for 2 responses"):
        score_distributed(["a", "b"], ["1", "2"], score_fn=lambda r, g: [RewardResult(False, False, None)])


@pytest.mark.slow
def test_rank_dependent_verifier_gives_identical_rewards_and_advantages():
    out = torchrun("reward_ranks.py", timeout=300)
    rows = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            _, rank, payload = line.split(" ", 2)
            rows[int(rank)] = json.loads(payload)
    assert sorted(rows) == [0, 1], out[-3000:]
    r0, r1 = rows[0], rows[1]
    # The verifier disagrees between ranks: scoring everything on each rank gives different rewards.
    assert r0["redundant"] != r1["redundant"]
    # Shared verdicts: sample i was checked by rank i % 2 (rank 0 says correct, rank 1 timed out).
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(12)]
    assert r0["r_acc"] == r1["r_acc"] == expected
    assert r0["metrics"] == r1["metrics"] == {"frac_formatted": 1.0, "frac_correct": 0.5, "num_timeouts": 6.0}
    assert r0["adv"] == r1["adv"] and r0["adv_equal_everywhere"] and r1["adv_equal_everywhere"]
    assert any(a != 0 for a in r0["adv"])  # mixed groups: the advantages carry the shared rewards
    # The real verifier pool, odd batch size (shares of 3 and 2): same verdicts everywhere, and right.
    assert r0["odd_acc"] == r1["odd_acc"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert r0["odd_formatted"] == r1["odd_formatted"] == [True, True, False, True, True]
    assert r0["odd_metrics"] == r1["odd_metrics"]
