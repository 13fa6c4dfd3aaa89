"""Qwen3-MoE conversion (issue 23): HF -> Megatron -> HF bit-exact (Qwen2-MoE's shared expert too);
the checkpoint loads at EP=2; the EP=2 export (the weight sync's stream) gives back every HF tensor
bit for bit; a model trained at EP=2 re-exports to an HF folder that transformers loads with the
trainer's log-probs and vLLM serves with transformers' greedy tokens; resume at EP=2 restores the
expert shards and their optimizer state (the 3rd step is bit-identical)."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.conversion.serving import hf_greedy, vllm_greedy
from tests.conversion.test_conversion import tensors
from tests.dist import torchrun
from tests.moe_models import TINY_MOE, save_tiny_moe


def _hf_logprobs(hf_dir):
    from transformers import AutoModelForCausalLM

    toks = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))  # the worker's
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(toks).logits, dim=-1)
    return logp.gather(-1, torch.roll(toks, -1, dims=1)[..., None]).squeeze(-1)


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: names differ: {sorted(set(got) ^ set(want))[:6]}"
    unequal = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not unequal, f"{what}: not bit-exact: {unequal[:6]}"


@pytest.mark.slow
def test_moe_conversion_export_and_resume_at_ep2(tmp_path):
    src = save_tiny_moe(tmp_path / "src", init_std=0.1)
    rt = tmp_path / "rt"
    # Qwen2-MoE too: the routed experts plus the shared expert and its gate.
    q2 = save_tiny_hf_model(tmp_path / "q2", "qwen2_moe", **{**TINY_MOE, "shared_expert_intermediate_size": 48})
    # One process: HF -> Megatron (chunks for any layout) -> HF (sharded into 20 KB files).
    torchrun("conversion_roundtrip.py", rt, f"moe={src}", f"q2={q2}", nproc=1, timeout=240)
    source = tensors(src)
    assert {f"model.layers.1.mlp.experts.3.{p}_proj.weight" for p in ("gate", "up", "down")} <= set(source)
    _assert_same_tensors(tensors(rt / "moe" / "hf"), source, "round trip")
    q2_source = tensors(q2)
    assert {"model.layers.1.mlp.shared_expert_gate.weight", "model.layers.1.mlp.shared_expert.up_proj.weight"} <= set(
        q2_source
    )
    _assert_same_tensors(tensors(rt / "q2" / "hf"), q2_source, "qwen2_moe round trip")

    torchrun("moe_conversion.py", tmp_path, src, rt / "moe" / "mcore", timeout=300)
    ref = _hf_logprobs(src)
    torch.testing.assert_close(torch.load(tmp_path / "ep2_logprobs.pt"), ref, atol=1e-4, rtol=0)
    _assert_same_tensors(torch.load(tmp_path / "ep2_export.pt"), source, "EP=2 export")

    resume = torch.load(tmp_path / "resume.pt")
    for rank, r in enumerate(resume):
        assert len(r["experts"]) == 2 * 2 * 2, r["experts"]  # 2 layers x 2 local experts x fc1/fc2
        assert r["experts_trained"] == r["experts"], f"rank {rank}: some experts did not train"
        assert r["unequal"] == [], f"rank {rank}: the resumed step differs: {r['unequal'][:5]}"

    # The trained model's re-export: the same tensors as its live EP=2 export, and transformers
    # computes the trainer's log-probs from it.
    trained = tensors(tmp_path / "trained_hf")
    _assert_same_tensors(trained, torch.load(tmp_path / "trained_export.pt"), "re-export after training")
    assert not torch.equal(
        trained["model.layers.0.mlp.experts.2.up_proj.weight"], source["model.layers.0.mlp.experts.2.up_proj.weight"]
    )
    torch.testing.assert_close(
        _hf_logprobs(tmp_path / "trained_hf"), torch.load(tmp_path / "trained_logprobs.pt"), atol=1e-4, rtol=0
    )
    # ... and vLLM serves it: its fused-expert loader takes the exported names and shapes.
    prompt = [1, 5, 9, 17, 33, 60]
    assert vllm_greedy(tmp_path / "trained_hf", prompt, 8, tokenizer=False) == hf_greedy(
        tmp_path / "trained_hf", prompt, 8
    )
