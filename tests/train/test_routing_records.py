"""r3 routing records (issue 23, `algo.routing_replay=r3`): the rollout engine's per-token expert
choices travel from the completions into the micro-batches exactly as `rollout_logprobs` do (through
mini-batches, the DP split, padding and packing), unrecorded positions route freely, and r3 is
refused up front, in one line, where vLLM cannot return routed experts (this CPU box)."""

from pathlib import Path

import pytest
import torch

from agpo_megatron.models.routing import _RouterHook
from agpo_megatron.rollout.base import Completion
from agpo_megatron.train.batch import split_mini_batches
from agpo_megatron.train.packing import unpack
from agpo_megatron.train.rollout_rounds import RolloutBatch
from agpo_megatron.train.sequences import Sequences

ROOT = Path(__file__).resolve().parents[2]

L, K, E = 3, 2, 8


def _record(tokens: list[int]) -> torch.Tensor:  # [n, L, K], a function of each token's id alone
    t = torch.tensor(tokens)[:, None, None]
    return (t + torch.arange(L)[None, :, None] * 3 + torch.arange(K)[None, None, :]) % E


def _seqs(n=8):
    # Unique token ids (each sequence its own range), ragged lengths; the engine's record covers all
    # but the last token (it never runs the last sampled token through the model).
    lens = [5, 9, 3, 7, 4, 6, 8, 2][:n]
    tokens = [list(range(100 * i + 1, 100 * i + 1 + m)) for i, m in enumerate(lens)]
    return Sequences(
        tokens=tokens,
        prompt_lens=[2] * n,
        advantages=torch.arange(n, dtype=torch.float32),
        routed_experts=[_record(t[:-1]) for t in tokens],
    )


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("dp", [1, 2])
def test_records_follow_tokens_into_micro_batches(packing, dp):
    seqs = _seqs()
    expected = dict(zip((t[0] for t in seqs.tokens), seqs.routed_experts))  # first token -> its record
    seen = 0
    for rank in range(dp):
        minis = split_mini_batches(
            seqs,
            seqs_per_update=4,
            dp=dp,
            dp_rank=rank,
            pad_id=0,
            micro_batch_size=2,
            max_tokens=None,
            uniform_length=False,
            packing=packing,
        )
        for mini in minis:
            for mb in mini.micro_batches:
                rec = mb["routed_experts"]
                assert sorted(rec) == list(range(L)) and all(r.dtype == torch.int32 for r in rec.values())
                assert all(r.shape == (*mb["tokens"].shape, K) for r in rec.values())
                stacked = torch.stack([rec[layer] for layer in range(L)], dim=2)  # [R, S, L, K]
                real = mb["tokens"] != 0
                if packing:  # unpacking gives each sequence's own record back, then -1 on its last token
                    for toks, per_seq in zip(unpack(mb, mb["tokens"]), unpack(mb, stacked)):
                        want = expected[int(toks[0])]
                        assert torch.equal(per_seq[: len(want)], want.to(torch.int32))
                        assert (per_seq[len(want) :] == -1).all()
                        seen += 1
                else:
                    for row, toks in zip(stacked, mb["tokens"]):
                        want = expected[int(toks[0])]
                        assert torch.equal(row[: len(want)], want.to(torch.int32))
                        assert (row[len(want) :] == -1).all()  # the last token and the padding: no record
                        seen += 1
                # every recorded position holds its own token's record
                ok = stacked[real] == _record(mb["tokens"][real].tolist()).to(torch.int32)
                assert (ok | (stacked[real] == -1)).all()
    assert seen == len(seqs)


def test_completions_carry_records_into_sequences():
    rec = [_record([5, 6, 7]), _record([5, 6, 8])]
    batch = RolloutBatch(
        prompts=[type("Ex", (), {"prompt_ids": [5, 6]})()],
        groups=[
            [
                Completion(
                    prompt_index=0, token_ids=[t, 1], logprobs=None, text="", finish_reason="stop", routed_experts=r
                )  # noqa: E501
                for t, r in zip((7, 8), rec)
            ]
        ],
        r_acc=torch.zeros(1, 2),
        rewards=torch.zeros(1, 2),
        advantages=torch.zeros(1, 2),
        metrics={},
        seen={},
    )
    seqs = batch.sequences()
    assert seqs.routed_experts is not None and all(a is b for a, b in zip(seqs.routed_experts, rec))
    assert seqs.select([1]).routed_experts[0] is rec[1]


def test_hook_replays_records_and_routes_unrecorded_tokens_freely():
    hook = _RouterHook()
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.05, 0.7], [0.4, 0.3, 0.2, 0.1]])  # [T=3, E=4]

    def topk(s, k, num_groups=None, group_topk=None):
        return s.topk(k, dim=-1)

    hook.mode = "replay"
    hook.target = torch.tensor([[2, 3], [-1, -1], [1, 2]])  # token 1 has no record
    hook.mask = torch.tensor([True, True, True])
    probs, idx = hook.get_replay_topk(scores, 2, default_compute_topk=topk)
    assert idx.tolist() == [[2, 3], [0, 3], [1, 2]]  # token 1 routed freely: its top-2 is {0, 3}
    assert torch.equal(probs, scores.gather(1, torch.tensor([[2, 3], [0, 3], [1, 2]])))
    # Tokens 0 and 2 would route elsewhere ({1, 2}, {0, 1}); token 1 is not counted.
    assert (hook.differ, hook.counted) == (2, 2)


def test_r3_is_refused_on_cpu_in_one_line(monkeypatch):
    from agpo_megatron.rollout.vllm_engine import VLLMEngine
    from agpo_megatron.runtime.vllm_features import routed_experts_unavailable

    why = routed_experts_unavailable()
    assert why is not None and "no CUDA device" in why and "\n" not in why
    # The engine refuses before it builds anything (torch.distributed is not even initialised).
    with pytest.raises(RuntimeError, match=r"^VLLMEngine\(return_routed_experts=True\): vLLM returns routed experts"):
        VLLMEngine("unused", return_routed_experts=True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert "VLLM_USE_V2_MODEL_RUNNER=0 is set" in routed_experts_unavailable()


def test_r3_validates_anywhere_and_the_machine_check_refuses_it_here(tmp_path):
    """`agpo check` / `agpo plan` accept an r3 config on a machine without GPUs (a login node); the
    machine check that `agpo train` runs before building anything refuses it here in one line."""
    from agpo_megatron.config.yaml_io import ConfigError
    from agpo_megatron.plan.load import load_train_config

    cfg = load_train_config(
        str(ROOT / "examples" / "tiny_cpu.yaml"),
        ["model.hf_path=tiny:qwen3_moe", "algo.routing_replay=r3", "rollout.logprob_mode=recompute"],
    )
    assert cfg.algo.routing_replay == "r3"
    with pytest.raises(ConfigError, match=r"^algo.routing_replay=r3 replays the routing vLLM sampled with, but") as e:
        cfg.check_machine()
    assert "\n" not in str(e.value) and "use r2 or none" in str(e.value)


def test_router_token_order_for_padded_and_thd_micro_batches():
    """The router sees `[S * R]` sequence-major on the padded / local-packed path (Megatron's [S, B, H]
    activations) and `[R * S]` on the THD path (rows flattened to one stream); a record goes there and
    comes back unchanged."""
    from agpo_megatron.models.routing import _from_router, _to_router

    rec = torch.arange(2 * 3 * 2).reshape(2, 3, 2)  # [R=2, S=3, K=2]: value 2 * (3 r + s) + k
    seq_major = _to_router(rec, thd=False)
    assert seq_major[:, 0].tolist() == [0, 6, 2, 8, 4, 10]  # s=0 of rows 0, 1, then s=1, ...
    assert _to_router(rec, thd=True)[:, 0].tolist() == [0, 2, 4, 6, 8, 10]  # row 0's tokens, then row 1's
    for thd in (False, True):
        assert torch.equal(_from_router(_to_router(rec, thd), 2, 3, thd), rec)


def test_vllm_records_become_narrow_tensors_on_the_completion():
    import numpy as np

    from agpo_megatron.rollout.vllm_engine import _completion

    out = type("Out", (), {})()
    out.token_ids, out.logprobs, out.text, out.finish_reason = [5, 6], None, "", "stop"
    out.routed_experts = np.array([[[0, 7]], [[3, 1]], [[2, 5]]], dtype=np.int32)  # [n=3, L=1, K=2]
    rec = _completion(0, out, version=4).routed_experts
    assert rec.dtype == torch.uint8 and rec.tolist() == out.routed_experts.tolist()
    out.routed_experts = np.array([[[300, 2]]], dtype=np.int64)  # more than 256 experts
    assert _completion(0, out, version=4).routed_experts.dtype == torch.int16
    del out.routed_experts  # an engine that does not return routing
    assert _completion(0, out, version=4).routed_experts is None
