"""2-rank worker: packed micro-batches against padded ones, at TP=1, TP=2 and PP=2 (local spec, fp32).

The same 12 ragged sequences go through the padded path (one right-padded sequence per row) and
the packed one (train/packing.py). Per layout, each rank writes OUT_DIR/{layout}_rank{r}.pt with, per
sequence, the log-probs and entropy of its tokens (last stage only), the summed loss of two loss
setups (plain path, seq-mean-token-mean with KL and entropy terms, which needs `seq_ids`; fused
path, token-mean) and this rank's parameter gradients, from both paths. The test compares them.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.models.lm_head import capture_lm_head_input
from agpo_megatron.ops.fused_loss import fused_policy_loss_from_hidden
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from agpo_megatron.train.batch import Sequences, split_micro_batches
from agpo_megatron.train.packing import unpack

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
model_cfg = ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=128)
T = 0.7

g = torch.Generator().manual_seed(0)
N = 12
prompt_lens = torch.randint(2, 7, (N,), generator=g).tolist()
resp_lens = [1, 2, 40, 3, 17, 5, 33, 8, 2, 11, 26, 6]  # long-tailed, one long enough to fill a row alone
tokens = [torch.randint(0, arch.vocab_size, (p + r,), generator=g).tolist() for p, r in zip(prompt_lens, resp_lens)]
seqs = Sequences(
    tokens=tokens,
    prompt_lens=prompt_lens,
    advantages=torch.randn(N, generator=g),
    rollout_logprobs=[(-torch.rand(r, generator=g) * 3).tolist() for r in resp_lens],
)
global_tokens, global_seqs = seqs.num_response_tokens(), N
LOSSES = {
    "plain": PolicyLossConfig(agg_mode="seq-mean-token-mean", kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
    "fused": PolicyLossConfig(agg_mode="token-mean", kl_coef=0.05, kl_estimator="k2"),
}


def per_sequence(mbs, outs, key):
    """Per-token `key` of every sequence, in `seqs` order, from either layout."""
    res, first = [None] * N, 0
    for mb, out in zip(mbs, outs):
        if "seq_ids" in mb:
            for i, v in zip(mb["seq_index"].tolist(), unpack(mb, out[key])):
                res[i] = v
        else:  # split by count: the sequences in order
            for row in range(mb["tokens"].shape[0]):
                res[first + row] = out[key][row, : len(seqs.tokens[first + row])]
            first += mb["tokens"].shape[0]
    return res


def loss_and_grads(ddp, model, mbs, name):
    cfg = LOSSES[name]
    common = dict(global_num_tokens=global_tokens, global_num_seqs=global_seqs, temperature=T)

    def extras(mb):
        return dict(ref_logprobs=mb["old_logprobs"] * 1.1, seq_ids=mb.get("seq_ids"))

    if name == "plain":

        def loss_fn(logits, mb):
            lp, ent = forward.vocab_parallel_logprobs(logits, mb["targets"], temperature=T)
            loss, m = policy_loss(
                lp,
                mb["old_logprobs"],
                mb["advantages"],
                mb["loss_mask"],
                cfg,
                entropy=ent,
                global_num_tokens=global_tokens,
                global_num_seqs=global_seqs,
                **extras(mb),
            )
            return loss, {**m, "loss": loss.detach()}
    else:

        def loss_fn(hidden, mb):
            loss, m, _, _ = fused_policy_loss_from_hidden(
                hidden,
                weight,
                mb["targets"],
                mb["old_logprobs"],
                mb["advantages"],
                mb["loss_mask"],
                cfg,
                chunk_tokens=64,
                **extras(mb),
                **common,
            )
            return loss, {**m, "loss": loss.detach()}

    ddp.zero_grad_buffer()
    with capture_lm_head_input(model) if name == "fused" else _null() as weight:
        out = forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
    loss = sum(float(o["loss"]) for o in out) if out else None
    return loss, {n: p.main_grad.clone() for n, p in model.named_parameters()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


for layout, tp, pp in [("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)]:
    lay = init_model_parallel(tp, pp, seed=1)
    model = build.build_gpt(arch, model_cfg, ParallelConfig(tp=tp, pp=pp))
    load_hf_weights(model, arch, HFCheckpointReader(hf_dir), tp_rank=lay.tp_rank, tp=tp, pp_rank=lay.pp_rank, pp=pp)
    ddp, _, _ = build.wrap_for_training(model, OptimConfig(lr=1e-3), ParallelConfig(tp=tp, pp=pp), total_steps=1)
    res = {}
    for path, packing in [("pad", False), ("pack", True)]:
        # PP: every micro-batch one shape (padded: the longest sequence; packed: rows of it).
        mbs = split_micro_batches(
            seqs,
            micro_batch_size=3,
            max_tokens=None,
            pad_id=0,
            uniform_length=pp > 1,
            pad_to_multiple=8,
            packing=packing,
        )
        for mb in mbs:
            mb["old_logprobs"] = mb["rollout_logprobs"]
        if packing:
            res["shapes_pack"] = [tuple(mb["tokens"].shape) for mb in mbs]
        outs = forward.compute_logprobs([ddp], mbs, temperature=T, with_entropy=True)
        if outs:
            res[f"logprobs_{path}"] = per_sequence(mbs, outs, "logprobs")
            res[f"entropy_{path}"] = per_sequence(mbs, outs, "entropy")
        for name in LOSSES:
            res[f"loss_{name}_{path}"], res[f"grads_{name}_{path}"] = loss_and_grads(ddp, model, mbs, name)
    if layout == "tp1":  # negative controls: what the parity relies on
        mbs = split_micro_batches(
            seqs, micro_batch_size=3, max_tokens=None, pad_id=0, uniform_length=False, packing=True
        )
        real_mask, real_rope = forward.packed_causal_mask, forward._rope_at
        forward.packed_causal_mask = lambda ids: forward.causal_mask(ids.shape[1], ids.device)  # attention crosses
        res["logprobs_causal_only"] = per_sequence(mbs, forward.compute_logprobs([ddp], mbs, temperature=T), "logprobs")
        forward.packed_causal_mask, forward._rope_at = real_mask, lambda module, pos: _null()  # RoPE at row offsets
        res["logprobs_row_positions"] = per_sequence(
            mbs, forward.compute_logprobs([ddp], mbs, temperature=T), "logprobs"
        )
        forward._rope_at = real_rope
    res["computed_tokens"] = {
        p: sum(
            mb["tokens"].numel()
            for mb in split_micro_batches(
                seqs, micro_batch_size=3, max_tokens=None, pad_id=0, uniform_length=pp > 1, packing=p == "pack"
            )
        )
        for p in ("pad", "pack")
    }
    torch.save(res, out_dir / f"{layout}_rank{lay.rank}.pt")
    dist.barrier()
exit_cleanly(0)
