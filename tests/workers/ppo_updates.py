"""2-rank worker (DP=2): PPO mini-batches through the real `Actor` (train/ppo.py, batch.split_mini_batches).

argv: hf_dir, "fused" | "plain".
1. One update per rollout: the on-policy shortcut (no actor log-prob pass, old = its own forward's
   detached log-probs) gives the recompute path's gradient, weights and metrics bit for bit; old
   log-probs off by 1e-4 do not (the comparison can fail).
2. Two mini-batches x 2 epochs at a large LR: update 1 has approx_kl = clip fraction = 0 exactly,
   every later one > 0.
Prints "RESULT <rank> ok" lines; any failed check raises (non-zero exit).
"""

import dataclasses
import sys
from pathlib import Path

import torch

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from agpo_megatron.train import ppo
from agpo_megatron.train.batch import Sequences, split_mini_batches
from agpo_megatron.train.policy import Actor
from tests.workers.actor_config import actor_config

hf_dir, fused = Path(sys.argv[1]), sys.argv[2] == "fused"
cfg = actor_config(hf_dir, algo=AlgoConfig(fused_loss=fused, loss_chunk_tokens=16), prompts=4)
arch = read_arch(hf_dir)
layout = init_model_parallel(1, 1, seed=3)
# entropy bonus on: the shortcut must also hold with the entropy term in the loss
loss_cfg = PolicyLossConfig(entropy_coef=0.01)
step_kw = {"temperature": 1.0, "kl_coef": 0.0, "eps": (0.2, 0.2)}

# A rollout of 4 prompts x G=2, prompt-major, identical on both ranks (the rollout is gathered).
g = torch.Generator().manual_seed(0)
P, G = 4, 2
tokens, prompt_lens = [], []
for _ in range(P):
    prompt = torch.randint(1, arch.vocab_size, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
    for _ in range(G):
        resp = torch.randint(1, arch.vocab_size, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist()
        tokens.append(prompt + resp)
        prompt_lens.append(len(prompt))
seqs = Sequences(tokens=tokens, prompt_lens=prompt_lens, advantages=torch.randn(P * G, generator=g))


def minis(prompts_per_update: int):
    return split_mini_batches(
        seqs,
        seqs_per_update=prompts_per_update * G,
        dp=layout.dp,
        dp_rank=layout.dp_rank,
        micro_batch_size=2,
        max_tokens=None,
        pad_id=0,
        uniform_length=False,
        pad_to_multiple=8,
    )


def state(actor):
    return (
        {n: p.main_grad.clone() for n, p in actor.model.named_parameters()},
        {n: p.detach().clone() for n, p in actor.model.named_parameters()},
    )


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# 1. one update per rollout: recompute vs the shortcut vs a perturbed old log-prob
results = {}
for label in ("recompute", "shortcut", "perturbed"):
    actor = Actor(arch, cfg, layout, total_steps=4)
    mbs_of = minis(P)
    if label == "shortcut":
        ppo.attach_logprobs(actor, None, mbs_of, mode="recompute", epochs=1, temperature=1.0)
        assert not any("old_logprobs" in mb for mb in mbs_of[0].micro_batches), "the shortcut ran a log-prob pass"
        m = ppo.update(actor, mbs_of, loss_cfg, mode="recompute", epochs=1, **step_kw)
    else:
        mini = mbs_of[0]
        for mb, out in zip(mini.micro_batches, actor.logprobs(mini.micro_batches, temperature=1.0)):
            mb["old_logprobs"] = out["logprobs"] - (1e-4 if label == "perturbed" else 0.0)
        m = actor.policy_step(
            mini.micro_batches, loss_cfg, global_num_tokens=mini.num_tokens, global_num_seqs=mini.num_seqs, **step_kw
        )
    results[label] = (m, *state(actor))
    del actor

(m_r, grad_r, w_r), (m_s, grad_s, w_s), (_, grad_p, _) = results["recompute"], results["shortcut"], results["perturbed"]
assert same(grad_r, grad_s), {k: (grad_r[k] - grad_s[k]).abs().max().item() for k in grad_r}
assert same(w_r, w_s), "weights after the step differ"
assert all(m_s[k] == v for k, v in m_r.items()), {k: (v, m_s[k]) for k, v in m_r.items() if m_s[k] != v}
assert m_r["approx_kl"] == 0 and m_r["pg_clipfrac"] == 0 and m_r["grad_norm"] > 0, m_r
assert not same(grad_r, grad_p), "a different old log-prob left the gradient unchanged: the check has no teeth"

# 2. two mini-batches x two epochs at a large LR: the later updates are off-policy
moving = dataclasses.replace(cfg, optim=OptimConfig(lr=5e-2, clip_grad=0.0))
actor = Actor(arch, moving, layout, total_steps=4)
per_update, policy_step = [], actor.policy_step


def recording_step(*a, **k):
    per_update.append(policy_step(*a, **k))
    return per_update[-1]


actor.policy_step = recording_step
parts = minis(P // 2)
ppo.attach_logprobs(actor, None, parts, mode="recompute", epochs=2, temperature=1.0)
assert all("old_logprobs" in mb for part in parts for mb in part.micro_batches)  # epoch 2 re-reads the first
summary = ppo.update(actor, parts, loss_cfg, mode="recompute", epochs=2, **step_kw)
kl = [u["approx_kl"] for u in per_update]
clip = [u["pg_clipfrac"] for u in per_update]
assert len(per_update) == 4 and kl[0] == 0 and clip[0] == 0, (kl, clip)
assert all(k > 0 for k in kl[1:]) and all(c > 0 for c in clip[1:]), (kl, clip)
assert summary["approx_kl_off_policy"] == sum(kl[1:]) / 3 and summary["approx_kl_last_update"] == kl[-1], summary
assert summary["pg_clipfrac_last_update"] == clip[-1] and summary["num_updates"] == 4, summary
sys.stdout.write(f"RESULT {layout.rank} ok kl={kl} clip={clip}\n")
sys.stdout.flush()
exit_cleanly(0)
