"""Megatron -> colocated vLLM weight sync, end to end on 2 CPU ranks (gloo, external_launcher).

Two torchrun runs (each vLLM launch costs ~10 s per process, so everything shares them):

- "tp2rollout": vLLM rollout TP=2 built from checkpoint A; Megatron loads checkpoint B at TP=2
  (synced, then perturbed and synced again), then at PP=2 (resharding PP=2 -> vLLM TP=2).
- "replicas": vLLM rollout TP=1, i.e. two independent replicas splitting the prompts, started
  with random (dummy) weights; Megatron loads B at PP=2.

vLLM never loads B itself, so agreement with Megatron can only come from the sync.
"""

from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from agpo_megatron.data.synthetic import build_tokenizer
from agpo_megatron.models.tiny import save_tiny_hf_model
from agpo_megatron.rollout.base import SamplingConfig
from tests.dist import torchrun

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
RUNS = {  # name -> (rollout_tp, Megatron layouts, load_format, logprob_mode)
    "tp2rollout": (2, "tp2,pp2", "auto", "rollout"),
    "replicas": (1, "pp2", "dummy", "recompute"),
}
PHASES = [
    ("tp2rollout", "tp2/synced"),
    ("tp2rollout", "tp2/perturbed"),
    ("tp2rollout", "pp2/synced"),
    ("replicas", "pp2/synced"),
]


class Runs(NamedTuple):
    ranks: dict[str, list[dict]]
    """Run name -> what each of the 2 ranks wrote."""
    tokenizer: Any
    meg_dir: Path
    """The checkpoint Megatron loaded (vLLM never did)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("vllm_sync")
    tok = build_tokenizer(root / "tok")
    # GQA (4 heads, 2 KV groups) with qkv bias, untied head; head dim 32 for vLLM's CPU kernel.
    # init_std 0.1 keeps the next-token distribution peaked enough that greedy has no near-ties.
    kw = dict(
        hidden_size=128,
        num_heads=4,
        num_kv_heads=2,
        num_layers=2,
        vocab_size=128,
        intermediate_size=256,
        init_std=0.1,
        eos_token_id=tok.eos_token_id,
        tokenizer=tok,
    )
    vllm_dir = save_tiny_hf_model(root / "A", "qwen2", seed=0, **kw)
    meg_dir = save_tiny_hf_model(root / "B", "qwen2", seed=1, **kw)
    results = {}
    for name, (rollout_tp, layouts, load_format, logprob_mode) in RUNS.items():
        out = root / name
        out.mkdir()
        torchrun("rollout_sync.py", vllm_dir, meg_dir, out, rollout_tp, layouts, load_format, logprob_mode, timeout=300)
        results[name] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return Runs(results, tok, meg_dir)


def _tokens(rows):
    return [r["token_ids"] for r in rows]


def _ref_logprobs(ranks, phase, key):
    """Megatron's log-probs live on the last pipeline stage only; take them from whoever has them."""
    found = [r[phase][key] for r in ranks if r[phase][key] is not None]
    assert found, f"{phase}: no rank returned {key}"
    return found[-1]


@pytest.mark.parametrize("run,phase", PHASES)
def test_vllm_greedy_equals_megatron_greedy_after_sync(runs, run, phase):
    ranks = runs.ranks[run]
    rec = ranks[0][phase]
    vllm_greedy = _tokens(rec["vllm_greedy"])
    assert vllm_greedy == rec["ref_greedy"]
    assert all(len(t) >= 1 for t in vllm_greedy)
    # The reference is broadcast to every stage; the two ranks' decodes must agree too.
    assert ranks[1][phase]["ref_greedy"] == rec["ref_greedy"]


@pytest.mark.parametrize("run,phase", PHASES)
def test_vllm_logprobs_match_megatron(runs, run, phase):
    """Greedy tokens at T=1 (vLLM's processed log-probs are then the raw ones) and samples at
    T=0.7 (processed = after temperature, the distribution actually sampled from)."""
    ranks = runs.ranks[run]
    rec = ranks[0][phase]
    for rows, key in [(rec["vllm_greedy"], "ref_greedy_logprobs"), (rec["vllm_sampled"], "ref_sampled_logprobs")]:
        ref = _ref_logprobs(ranks, phase, key)
        assert len(ref) == len(rows)
        for row, ref_lp in zip(rows, ref, strict=True):
            assert len(row["logprobs"]) == len(row["token_ids"]) == len(ref_lp)
            torch.testing.assert_close(torch.tensor(row["logprobs"]), torch.tensor(ref_lp), atol=1e-4, rtol=0)


def test_sync_is_what_makes_vllm_agree(runs):
    ranks = runs.ranks["tp2rollout"][0]
    synced = _tokens(ranks["tp2/synced"]["vllm_greedy"])
    # Before any sync vLLM runs checkpoint A, which Megatron never loaded.
    assert _tokens(ranks["pre_sync"]) != synced
    # Perturbing Megatron's weights and syncing again changes what vLLM generates.
    assert _tokens(ranks["tp2/perturbed"]["vllm_greedy"]) != synced
    # Re-loading B at PP=2 and syncing brings vLLM back to B's generations.
    assert _tokens(ranks["pp2/synced"]["vllm_greedy"]) == synced


@pytest.mark.parametrize("run", list(RUNS))
def test_every_rank_gets_all_completions_in_prompt_order(runs, run):
    r0, r1 = runs.ranks[run]
    for phase in [p for name, p in PHASES if name == run]:
        for key, n in [("vllm_greedy", 1), ("vllm_sampled", 2)]:
            assert r0[phase][key] == r1[phase][key], f"{phase} {key}: ranks disagree"
            assert [row["prompt_index"] for row in r0[phase][key]] == [i for i in range(5) for _ in range(n)]
        # Two samples of one prompt use different seeds: at 16 tokens they cannot all coincide.
        samples = _tokens(r0[phase]["vllm_sampled"])
        assert any(samples[2 * i] != samples[2 * i + 1] for i in range(5))


def test_samples_do_not_depend_on_rollout_tp(runs):
    """Seeds follow the global prompt index, not the replica: TP=2 (one replica) and TP=1 (two
    replicas, prompts split 3 + 2) sample the same tokens from the same synced weights."""
    one_replica = runs.ranks["tp2rollout"][0]["pp2/synced"]["vllm_sampled"]
    two_replicas = runs.ranks["replicas"][0]["pp2/synced"]["vllm_sampled"]
    assert _tokens(one_replica) == _tokens(two_replicas)


def test_completion_text_and_finish_reason(runs):
    results, tok = runs.ranks, runs.tokenizer
    for rows in [
        results["tp2rollout"][0]["tp2/perturbed"]["vllm_sampled"],
        results["replicas"][0]["pp2/synced"]["vllm_sampled"],
    ]:
        for row in rows:
            assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
            ended_on_eos = row["token_ids"][-1] == tok.eos_token_id
            assert row["finish_reason"] == ("stop" if ended_on_eos else "length")
            assert ended_on_eos or len(row["token_ids"]) == NEW_TOKENS
    # The samples exercise both endings, so the check above is not one-sided.
    reasons = {
        row["finish_reason"]
        for run in results.values()
        for r in run[0].values()
        if isinstance(r, dict)
        for row in r.get("vllm_sampled", [])
    }
    assert reasons == {"stop", "length"}


def test_logprob_mode(runs):
    """'rollout' returns log-probs on every completion; 'recompute' only when asked for."""
    results = runs.ranks
    assert all(row["logprobs"] is not None for row in results["tp2rollout"][0]["no_logprobs"])
    assert all(row["logprobs"] is None for row in results["replicas"][0]["no_logprobs"])
    assert all(row["logprobs"] is not None for row in results["replicas"][0]["pp2/synced"]["vllm_greedy"])


def test_sync_stats(runs):
    from safetensors.torch import load_file

    results, meg_dir = runs.ranks, runs.meg_dir
    stats = results["tp2rollout"][0]["tp2/synced"]["stats"]
    checkpoint = load_file(meg_dir / "model.safetensors")
    assert stats["tensors"] == len(checkpoint) == 2 * 12 + 3
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in checkpoint.values())
    assert stats["buckets"] > 1  # 64 KiB buckets: the sync really streamed in pieces
    assert stats["seconds"] > 0


# ---- pure helpers (no processes) ----------------------------------------------------------------


def test_sampling_config_validates():
    SamplingConfig(temperature=0.0, top_k=5)
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0), dict(max_new_tokens=0), dict(seed=-1)]:
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_from_config_maps_the_rollout_and_model_sections(monkeypatch):
    from agpo_megatron.config.model import ModelConfig
    from agpo_megatron.config.schema import RolloutConfig
    from agpo_megatron.rollout.vllm_engine import VLLMEngine

    seen = {}
    monkeypatch.setattr(VLLMEngine, "__init__", lambda self, path, **kw: seen.update(path=path, **kw))
    VLLMEngine.from_config(
        RolloutConfig(
            tp=2,
            logprob_mode="rollout",
            gpu_memory_utilization=0.4,
            kv_cache_memory_bytes=2**28,
            enable_sleep_mode=False,
            enforce_eager=True,
        ),
        ModelConfig(hf_path="/models/x", params_dtype="float32", max_seq_len=3000),
        seed=9,
        return_routed_experts=True,
    )
    assert seen == dict(
        path="/models/x",
        rollout_tp=2,
        logprob_mode="rollout",
        dtype="float32",
        max_model_len=3000,
        seed=9,
        load_format="dummy",
        gpu_memory_utilization=0.4,
        kv_cache_memory_bytes=2**28,
        enable_sleep_mode=False,
        sleep_level=2,
        enforce_eager=True,
        return_routed_experts=True,
    )
