"""PPO mini-batches (train/ppo.py, batch.split_mini_batches) on fakes: which update is on-policy, which
mini-batches get an actor log-prob pass, the per-rollout metrics, and the global counts."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.train import ppo
from agpo_megatron.train.batch import Sequences, split_mini_batches


def _rollout(prompts=4, g=2):
    # prompt i has i + 2 tokens; response j of prompt i has i + j + 1 tokens
    tokens, plens = [], []
    for i in range(prompts):
        for j in range(g):
            tokens.append([1] * (i + 2) + [7] * (i + j + 1))
            plens.append(i + 2)
    rollout_lp = [[-0.5] * (len(t) - p) for t, p in zip(tokens, plens)]
    return Sequences(
        tokens=tokens,
        prompt_lens=plens,
        advantages=torch.arange(prompts * g, dtype=torch.float),
        rollout_logprobs=rollout_lp,
    )


def _split(seqs, per_update, dp, rank, mbs=1):
    return split_mini_batches(
        seqs,
        seqs_per_update=per_update,
        dp=dp,
        dp_rank=rank,
        micro_batch_size=mbs,
        max_tokens=None,
        pad_id=0,
        uniform_length=False,
        pad_to_multiple=1,
    )


def test_mini_batches_are_whole_groups_with_global_counts():
    seqs = _rollout()
    for dp in (1, 2):
        per_rank = [_split(seqs, per_update=4, dp=dp, rank=r) for r in range(dp)]
        assert all(len(m) == 2 for m in per_rank)  # 8 sequences, 4 per update (2 prompts x G 2)
        for k in range(2):
            mini = seqs.select(range(4 * k, 4 * k + 4))
            assert {m[k].num_tokens for m in per_rank} == {mini.num_response_tokens()}  # the global count, every rank
            assert {m[k].num_seqs for m in per_rank} == {4}
            advs = sorted(a for m in per_rank for mb in m[k].micro_batches for a in mb["advantages"].tolist())
            assert advs == [4.0 * k + i for i in range(4)]  # the ranks' slices partition the mini-batch
            assert (
                sum(mb["loss_mask"].sum().item() for m in per_rank for mb in m[k].micro_batches)
                == mini.num_response_tokens()
            )
    with pytest.raises(ValueError, match="do not split into mini-batches of 3"):
        _split(seqs, per_update=3, dp=2, rank=0)
    # Issue 22: a short rollout (dynamic sampling) ends with a shorter mini-batch, with its own counts.
    short = _split(seqs, per_update=3, dp=1, rank=0)
    assert [m.num_seqs for m in short] == [3, 3, 2]
    assert short[2].num_tokens == seqs.select(range(6, 8)).num_response_tokens()


class FakeActor:
    def __init__(self):
        self.logprob_calls, self.steps = [], []

    def logprobs(self, mbs, *, temperature):
        self.logprob_calls.append(len(mbs))
        return [{"logprobs": torch.full(mb["targets"].shape, -1.0)} for mb in mbs]

    def policy_step(self, mbs, loss_cfg, *, on_policy, global_num_tokens, global_num_seqs, **kw):
        assert on_policy or all("old_logprobs" in mb for mb in mbs)
        self.steps.append((on_policy, global_num_tokens, global_num_seqs))
        i = len(self.steps) - 1
        return {"approx_kl": 0.1 * i, "pg_clipfrac": 0.01 * i, "lr": float(i), "nonfinite_steps_total": 0.0}


@pytest.mark.parametrize(
    "mode,epochs,updates,passes,on_policy",
    [
        ("recompute", 1, 1, 0, [True]),  # the default: no actor log-prob pass at all
        ("recompute", 1, 3, 2, [True, False, False]),  # the first mini-batch's own forward, the others' once
        ("recompute", 2, 2, 2, [False] * 4),  # epoch 2 re-reads the first mini-batch's old log-probs
        ("rollout", 1, 2, 0, [False, False]),  # the engine's log-probs are the old ones
    ],
)
def test_which_updates_are_on_policy(mode, epochs, updates, passes, on_policy):
    seqs = _rollout(prompts=6)
    minis = _split(seqs, per_update=len(seqs) // updates, dp=1, rank=0)
    actor = FakeActor()
    ppo.attach_logprobs(actor, None, minis, mode=mode, epochs=epochs, temperature=1.0)
    assert len(actor.logprob_calls) == passes
    row = ppo.update(
        actor, minis, PolicyLossConfig(), mode=mode, epochs=epochs, temperature=1.0, kl_coef=0.0, eps=(0.2, 0.2)
    )
    assert [s[0] for s in actor.steps] == on_policy
    assert [s[1] for s in actor.steps] == [m.num_tokens for m in minis] * epochs
    if mode == "rollout":
        assert all(torch.equal(mb["old_logprobs"], mb["rollout_logprobs"]) for m in minis for mb in m.micro_batches)
    n = updates * epochs
    assert row["num_updates"] == n and row["lr"] == n - 1  # lr: the last update's
    assert row["approx_kl"] == pytest.approx(0.1 * (n - 1) / 2) and row["approx_kl_last_update"] == pytest.approx(
        0.1 * (n - 1)
    )
    assert row["pg_clipfrac_last_update"] == pytest.approx(0.01 * (n - 1))
    if n > 1:  # updates 2..n, the ones away from the sampling weights
        assert row["approx_kl_off_policy"] == pytest.approx(0.1 * sum(range(1, n)) / (n - 1))
    else:
        assert "approx_kl_off_policy" not in row


def test_reference_log_probs_once_per_rollout():
    class Ref:
        calls = 0

        def resident(self):
            return contextlib.nullcontext()

        def logprobs(self, mbs, *, temperature):
            Ref.calls += 1
            return [{"logprobs": torch.zeros(mb["targets"].shape)} for mb in mbs]

    minis = _split(_rollout(), per_update=4, dp=1, rank=0)
    ppo.attach_logprobs(FakeActor(), Ref(), minis, mode="recompute", epochs=3, temperature=1.0)
    assert Ref.calls == 2 and all("ref_logprobs" in mb for m in minis for mb in m.micro_batches)


def test_offloaded_reference_is_resident_once_per_rollout_and_copied_to_host_once(monkeypatch):
    """Issue 18 item 3: with offload.reference the Reference came to the device and went back to host
    (a full device->host copy of frozen weights) once per mini-batch. The real `Reference` on a tiny
    module: per rollout of 4 mini-batches, one reload; over 3 rollouts, one host copy in all."""
    from agpo_megatron.train import policy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    seen = []

    def scores(chunks, mbs, **kw):  # the forward: records whether the weights were there
        seen.append(all(p.untyped_storage().nbytes() > 0 for p in model.parameters()))
        return [{"logprobs": torch.zeros(mb["targets"].shape)} for mb in mbs]

    monkeypatch.setattr(policy, "_build", lambda arch, cfg, layout: model)
    monkeypatch.setattr(policy.forward, "compute_logprobs", scores)
    cfg = SimpleNamespace(algo=SimpleNamespace(fused_loss=False), offload=SimpleNamespace(reference=True))
    ref = policy.Reference("arch", cfg, layout=None)
    stash = ref.memory
    assert stash.on_host and stash.copies_to_host == 1 and stash.reloads == 0
    for rollout in range(1, 4):
        minis = _split(_rollout(), per_update=2, dp=1, rank=0)  # 4 mini-batches
        ppo.attach_logprobs(FakeActor(), ref, minis, mode="recompute", epochs=1, temperature=1.0)
        assert stash.on_host and stash.reloads == rollout, stash.reloads  # one residency per rollout
        assert stash.copies_to_host == 1  # frozen: never copied device->host again
    assert len(seen) == 12 and all(seen)
    w = model[0].weight
    with ref.resident():
        assert torch.equal(w, w.clone())  # restored from the one host copy (readable, not freed)


def test_rollout_row_means_updates_but_keeps_extremes_and_last_values():
    rows = [
        {"pg_loss": 1.0, "ratio_max": 1.0, "ratio_min": 1.0, "lr": 1e-3, "approx_kl": 0.0},
        {"pg_loss": 3.0, "ratio_max": 1.5, "ratio_min": 0.7, "lr": 2e-3, "approx_kl": 0.2},
        {"pg_loss": 2.0, "ratio_max": 1.2, "ratio_min": 0.9, "lr": 3e-3, "approx_kl": 0.4},
    ]
    row = ppo.summarize(rows)
    assert row["pg_loss"] == 2.0 and row["ratio_max"] == 1.5 and row["ratio_min"] == 0.7 and row["lr"] == 3e-3
    assert row["num_updates"] == 3.0 and row["approx_kl_last_update"] == 0.4
    assert row["approx_kl_off_policy"] == pytest.approx(0.3)
    assert ppo.summarize([]) == {"num_updates": 0.0}
