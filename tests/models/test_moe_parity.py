"""Qwen3-MoE and Qwen2-MoE in Megatron (issue 23): log-probs equal transformers' at EP=1 and at EP=2
(2 gloo ranks), with and without `norm_topk_prob`, and gradients reach the router, every rank's own
experts and (qwen2_moe) the shared expert and its gate."""

import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.dist import torchrun
from tests.moe_models import TINY_MOE


def _hf_logprobs(hf_dir, temperature=0.7):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4, 24), generator=g)  # the worker's tokens
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens).logits / temperature, dim=-1)
    targets = torch.roll(tokens, -1, dims=1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type, norm_topk_prob",
    # Both routing forms; qwen2_moe (Qwen1.5-MoE: norm_topk_prob false) adds the gated shared expert.
    [("qwen3_moe", True), ("qwen2_moe", False)],
)
def test_moe_logprobs_match_hf_at_ep1_and_ep2(tmp_path, model_type, norm_topk_prob):
    # qwen2_moe: seed 2, whose routing sends the backward's 48 tokens to every expert of both layers
    # (seed 0 leaves one expert without a token, so "every expert gets gradient" could not hold).
    shared = {"shared_expert_intermediate_size": 48, "seed": 2} if model_type == "qwen2_moe" else {}
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf",
        model_type,
        **{**TINY_MOE, "vocab_size": 128, "num_experts_per_tok": 2, "norm_topk_prob": norm_topk_prob, **shared},
    )
    torchrun("moe_parity.py", hf_dir, tmp_path, timeout=240)
    ref_lp, ref_ent = _hf_logprobs(hf_dir)
    for name in ("ep1", "ep2"):
        res = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(res["logprobs"], ref_lp, atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(res["entropy"], ref_ent, atol=1e-4, rtol=0, msg=name)
    # Backward at EP=2: each rank holds experts 0-1 (rank 0) / 2-3 (rank 1) as local 0-1; the
    # router and, with 48 tokens and top-2 of 4, every expert get a non-zero gradient.
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grad_ep2_rank{rank}.pt")
        for layer in (0, 1):
            assert grads[f"decoder.layers.{layer}.mlp.router.weight"].abs().sum() > 0
            for e in (0, 1):
                assert grads[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"].abs().sum() > 0
            shared_names = {n for n in grads if ".mlp.shared_experts." in n and f"layers.{layer}." in n}
            if model_type == "qwen2_moe":  # the shared expert and its gate: replicated over EP, all get gradient
                assert shared_names == {
                    f"decoder.layers.{layer}.mlp.shared_experts.{n}"
                    for n in ("linear_fc1.weight", "linear_fc2.weight", "gate_weight")
                }
                assert all(grads[n].abs().sum() > 0 for n in shared_names)
            else:
                assert not shared_names


@pytest.mark.slow
def test_aux_loss_gradient_is_layout_independent_and_logged(tmp_path):
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "qwen3_moe", hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32, num_layers=2
    )
    torchrun("moe_aux_loss.py", hf_dir, tmp_path, timeout=240)
    ref = torch.load(tmp_path / "grads_one.pt")
    # The last layer's router gradient is coef * d(switch loss)/dW worked by hand (no upstream path).
    by_hand = ref.pop("by_hand")
    torch.testing.assert_close(ref["decoder.layers.1.mlp.router.weight"], by_hand, atol=1e-7, rtol=1e-5)
    assert set(ref) == {f"decoder.layers.{i}.mlp.router.weight" for i in (0, 1)}
    for name, grad in ref.items():
        assert grad.abs().max() > 1e-6, f"{name}: no load-balancing gradient"
    for case in ("two_micro_batches", "doubled_rows", "uneven_ranks"):
        got = torch.load(tmp_path / f"grads_{case}.pt")
        for name, grad in ref.items():
            torch.testing.assert_close(got[name], grad, atol=1e-7, rtol=1e-5, msg=f"{case} {name}")
        # A uniform router: probabilities 1/E, top-k always the first k experts: E * (k/E) / k = 1.
        assert torch.load(tmp_path / f"aux_{case}.pt").item() == pytest.approx(1.0, abs=1e-6)
