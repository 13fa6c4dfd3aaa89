"""2-rank worker: the fused policy loss against the plain path at TP=1 and TP=2, and
`capture_lm_head_input` on a tiny GPTModel.

For each case in CASES and each layout, every rank builds the same full-vocabulary problem from
a fixed seed, keeps its vocab slice of the output weight, and computes

* the reference: logits = hidden @ W_r.T -> `vocab_parallel_logprobs` -> `policy_loss`, and
* the fused op, from hidden states and from (a leaf copy of) the logits,

each followed by backward. Hidden states go through a copy-to-TP mapping on both paths (Megatron's
on the reference, `copy_to_tp_region` on the fused op), as Megatron's output layer does, so
d_hidden is the full (TP-summed) gradient.
Results go to OUT_DIR/{case}_tp{tp}_rank{tp_rank}.pt; at TP=1 (DP=2, both ranks identical)
only rank 0 writes. `tests/ops/test_fused_loss.py` does the comparing.

The model part writes OUT_DIR/capture_tie{0,1}_tp{tp}_rank{tp_rank}.pt: the model's logits and
the captured hidden @ weight.T, forward-only log-probs and entropy from the captured hidden
states, and the reference and fused losses with the gradients of every parameter.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from agpo_megatron.algo.loss import PolicyLossConfig


@dataclasses.dataclass(frozen=True)
class Case:
    cfg: PolicyLossConfig
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    chunk_tokens: int = 16
    global_counts: bool = False  # pass global_num_tokens / global_num_seqs (other micro-batches)


# B=4, S=13 -> N=52 tokens. Chunk sizes 16, 5, 11 do not divide 52; 52 and 1000 give one chunk.
CASES = {
    "token_mean": Case(cfg=PolicyLossConfig(), chunk_tokens=16, global_counts=True),
    "clip_higher_temperature": Case(cfg=PolicyLossConfig(eps_high=0.28), temperature=0.7, chunk_tokens=52),
    "seq_mean_token_mean_k3_entropy": Case(
        cfg=PolicyLossConfig(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, agg_mode="seq-mean-token-mean"),
        chunk_tokens=5,
        global_counts=True,
    ),
    "seq_mean_token_sum_symmetric_dual_clip_tis": Case(
        cfg=PolicyLossConfig(
            kl_coef=0.1,
            kl_estimator="symmetric",
            entropy_coef=0.02,
            dual_clip_c=1.5,
            tis_cap=1.5,
            agg_mode="seq-mean-token-sum",
        ),
        temperature=1.3,
        chunk_tokens=1000,
    ),
    "k1": Case(cfg=PolicyLossConfig(kl_coef=0.2, kl_estimator="k1"), chunk_tokens=11),
    "k2_entropy": Case(cfg=PolicyLossConfig(kl_coef=0.2, kl_estimator="k2", entropy_coef=0.05), chunk_tokens=11),
    "bf16_k3_entropy": Case(
        cfg=PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01),
        dtype=torch.bfloat16,
        temperature=0.9,
        chunk_tokens=16,
    ),
    # GSPO (issue 22): the sequence ratio couples a sequence's tokens across chunks of 5 and 16.
    "gspo_seq_mean": Case(
        cfg=PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", eps_low=0.05, eps_high=0.05),
        chunk_tokens=5,
        global_counts=True,
    ),
    "gspo_k3_entropy_dual_clip": Case(
        cfg=PolicyLossConfig(
            ratio_level="sequence", kl_coef=0.05, entropy_coef=0.01, dual_clip_c=1.05, eps_low=0.05, eps_high=0.05
        ),
        temperature=0.8,
        chunk_tokens=16,
    ),
    # Rollout correction (issue 21): masked importance weights per token, truncated ones per sequence.
    "mis_token": Case(
        cfg=PolicyLossConfig(rollout_correction="mis", mis_low=0.8, mis_high=1.25), chunk_tokens=5, global_counts=True
    ),
    "tis_sequence_seq_mean": Case(
        cfg=PolicyLossConfig(tis_cap=1.02, correction_level="sequence", agg_mode="seq-mean-token-mean"),
        chunk_tokens=16,
    ),
    "bf16_seq_mean_dual_clip_tis": Case(
        cfg=PolicyLossConfig(dual_clip_c=1.5, tis_cap=1.5, agg_mode="seq-mean-token-mean"),
        dtype=torch.bfloat16,
        chunk_tokens=5,
    ),
}
B, S, H, V = 4, 13, 64, 384
CAPTURE_CFG = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, eps_high=0.28)


def make_problem(case: Case) -> dict[str, torch.Tensor]:
    """The full-vocabulary problem, identical on every rank and layout."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g)
    weight = 0.3 * torch.randn(V, H, generator=g)  # logits with std ~2.4
    targets = torch.randint(0, V, (B, S), generator=g)
    lengths = torch.tensor([13, 9, 4, 0])  # ragged, and one sequence with no response token
    mask = (torch.arange(S) < lengths[:, None]) & (torch.arange(S) >= 2)  # first 2 = "prompt"
    with torch.no_grad():
        # On-policy-ish log-probs of the fp32 model, so ratios land on both sides of the clip.
        full = torch.log_softmax(hidden @ weight.T / case.temperature, dim=-1)
        lp = full.gather(-1, targets[..., None]).squeeze(-1)
    old = lp + 0.8 * torch.randn(B, S, generator=g)
    old = torch.where(mask, old, -torch.inf)  # padding garbage must not leak anywhere
    return dict(
        hidden=hidden.to(case.dtype),
        weight=weight.to(case.dtype),
        targets=targets,
        mask=mask,
        old=old,
        adv=torch.randn(B, generator=g),
        ref=lp + 0.3 * torch.randn(B, S, generator=g),
        rollout=old + 0.3 * torch.randn(B, S, generator=g),
    )


def loss_kwargs(case: Case, p: dict[str, torch.Tensor]) -> dict:
    corrected = case.cfg.rollout_correction != "none"
    kw = dict(ref_logprobs=p["ref"], rollout_logprobs=p["rollout"] if corrected else None)
    if case.global_counts:
        kw.update(global_num_tokens=p["mask"].sum() + 7, global_num_seqs=B + 2)
    return kw


def run_case(case: Case, tp: int, tp_rank: int) -> dict:
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from agpo_megatron.algo.loss import policy_loss
    from agpo_megatron.models.forward import vocab_parallel_logprobs
    from agpo_megatron.models.lm_head import copy_to_tp_region
    from agpo_megatron.ops.fused_loss import (
        fused_policy_loss_from_hidden,
        fused_policy_loss_from_logits,
    )

    p = make_problem(case)
    v_local = V // tp
    w_local = p["weight"][tp_rank * v_local : (tp_rank + 1) * v_local]
    common = (p["old"], p["adv"], p["mask"], case.cfg)
    kw = loss_kwargs(case, p)
    out = {}

    def leaves():
        return p["hidden"].clone().requires_grad_(), w_local.clone().requires_grad_()

    # reference from hidden states
    h, w = leaves()
    logits = copy_to_tensor_model_parallel_region(h) @ w.T
    lp, ent = vocab_parallel_logprobs(logits, p["targets"], temperature=case.temperature)
    loss, metrics = policy_loss(lp, *common, entropy=ent, **kw)
    loss.backward()
    out["ref"] = dict(
        loss=loss.detach(), metrics=metrics, lp=lp.detach(), ent=ent.detach(), d_hidden=h.grad, d_weight=w.grad
    )

    # fused from hidden states
    h, w = leaves()
    loss, metrics, lp, ent = fused_policy_loss_from_hidden(
        copy_to_tp_region(h),
        w,
        p["targets"],
        *common,
        temperature=case.temperature,
        chunk_tokens=case.chunk_tokens,
        **kw,
    )
    loss.backward()
    out["fused"] = dict(
        loss=loss.detach(), metrics=metrics, lp=lp.detach(), ent=ent.detach(), d_hidden=h.grad, d_weight=w.grad
    )

    # reference and fused from logits
    with torch.no_grad():
        logits0 = p["hidden"] @ w_local.T  # [B, S, V/TP]
    for name in ("ref_logits", "fused_logits"):
        z = logits0.clone().requires_grad_()
        if name == "ref_logits":
            lp, ent = vocab_parallel_logprobs(z, p["targets"], temperature=case.temperature)
            loss, metrics = policy_loss(lp, *common, entropy=ent, **kw)
        else:
            loss, metrics, lp, ent = fused_policy_loss_from_logits(
                z,
                p["targets"],
                *common,
                temperature=case.temperature,
                chunk_tokens=case.chunk_tokens,
                **kw,
            )
        loss.backward()
        out[name] = dict(loss=loss.detach(), metrics=metrics, lp=lp.detach(), ent=ent.detach(), d_logits=z.grad)
    return out


def run_capture(tie: bool, tp: int) -> dict:
    """Reference (model logits -> vocab_parallel_logprobs -> policy_loss) vs fused on captured
    hidden states, on one randomly initialised tiny GPTModel: logits and every parameter's grad."""
    from agpo_megatron.algo.loss import policy_loss
    from agpo_megatron.config.model import ModelConfig, ParallelConfig
    from agpo_megatron.models import build
    from agpo_megatron.models.forward import causal_mask, vocab_parallel_logprobs
    from agpo_megatron.models.hf_config import arch_from_hf_dict
    from agpo_megatron.models.lm_head import capture_lm_head_input
    from agpo_megatron.models.tiny import tiny_hf_config
    from agpo_megatron.ops.fused_loss import (
        fused_logprobs_entropy,
        fused_policy_loss_from_hidden,
    )
    from agpo_megatron.runtime.cpu_platform import megatron_scope

    arch = arch_from_hf_dict(
        tiny_hf_config("qwen2", vocab_size=256, hidden_size=64, num_heads=2, num_kv_heads=1, tie=tie).to_dict()
    )
    model_cfg = ModelConfig(init_from="random", params_dtype="float32", spec="local", max_seq_len=32)
    model = build.build_gpt(arch, model_cfg, ParallelConfig(tp=tp))
    with torch.no_grad():  # Megatron's 0.02-std init gives near-uniform softmaxes; sharpen them
        (model.embedding.word_embeddings.weight if tie else model.output_layer.weight).mul_(15.0)

    g = torch.Generator().manual_seed(1)
    b, s = 2, 12
    tokens = torch.randint(0, arch.vocab_size, (b, s), generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    mask = (torch.arange(s) >= 3).expand(b, -1)
    adv = torch.randn(b, generator=g)
    noise, ref_noise = torch.randn(b, s, generator=g), torch.randn(b, s, generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    attn = causal_mask(s, torch.device("cpu"))

    def grads() -> dict[str, torch.Tensor]:
        out = {name: prm.grad.clone() for name, prm in model.named_parameters() if prm.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    res = {}
    with megatron_scope():
        logits = model(tokens, pos, attn)  # [b, s, V/TP]
        lp, ent = vocab_parallel_logprobs(logits, targets)
        old, ref = lp.detach() + 0.5 * noise, lp.detach() + 0.3 * ref_noise
        loss, _ = policy_loss(lp, old, adv, mask, CAPTURE_CFG, ref_logprobs=ref, entropy=ent)
        loss.backward()
        res.update(
            logits=logits.detach(), ref_lp=lp.detach(), ref_ent=ent.detach(), ref_loss=loss.detach(), ref_grads=grads()
        )

        with capture_lm_head_input(model) as weight:
            hidden = model(tokens, pos, attn)  # [b, s, H]
            with torch.no_grad():  # the old / reference log-prob pass
                res["fwd_lp"], res["fwd_ent"] = fused_logprobs_entropy(
                    model(tokens, pos, attn), targets, weight=weight, chunk_tokens=5
                )
        loss, _, _, _ = fused_policy_loss_from_hidden(
            hidden, weight, targets, old, adv, mask, CAPTURE_CFG, ref_logprobs=ref, chunk_tokens=7
        )
        loss.backward()
        res.update(
            captured_logits=(hidden @ weight.T).detach(),
            hidden_shape=torch.tensor(hidden.shape),
            fused_loss=loss.detach(),
            fused_grads=grads(),
        )
        # The context manager must restore the model's own output layer.
        res["logits_after"] = model(tokens, pos, attn).detach()
    return res


def main() -> None:
    import torch.distributed as dist

    from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

    out_dir = Path(sys.argv[1])
    for tp in (1, 2):
        lay = init_model_parallel(tp, 1, seed=1)
        writes = tp > 1 or lay.rank == 0
        for name, case in CASES.items():
            res = run_case(case, tp, lay.tp_rank)
            if writes:
                torch.save(res, out_dir / f"{name}_tp{tp}_rank{lay.tp_rank}.pt")
        for tie in (False, True):
            res = run_capture(tie, tp)
            if writes:
                torch.save(res, out_dir / f"capture_tie{int(tie)}_tp{tp}_rank{lay.tp_rank}.pt")
        dist.barrier()
    exit_cleanly(0)


if __name__ == "__main__":
    main()
