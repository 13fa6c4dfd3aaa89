"""2-rank worker: one real `Actor.policy_step` (fused loss, TP=argv[3]) under `strict_collectives`.

Prints "CHECKED <n> <names>" on success; any collective given a tensor off the comm device raises
(issue 8 D1: `reduce_token_weighted` all-reduced a CPU tensor, which NCCL rejects).
"""

import sys
from pathlib import Path

import torch

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from agpo_megatron.train.policy import Actor
from tests.strict_collectives import strict_collectives
from tests.workers.actor_config import actor_config

hf_dir, tp, fused = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "fused"
cfg = actor_config(hf_dir, algo=AlgoConfig(fused_loss=fused, loss_chunk_tokens=16), tp=tp)
arch = read_arch(hf_dir)
layout = init_model_parallel(tp, 1, seed=3)
actor = Actor(arch, cfg, layout, total_steps=1)

g = torch.Generator().manual_seed(0)
N, S = 4 // layout.dp, 24
tokens = torch.randint(0, arch.vocab_size, (N, S), generator=g)
mask = torch.zeros(N, S)
mask[:, 5:20] = 1.0
mb = dict(
    tokens=tokens,
    targets=torch.roll(tokens, -1, 1),
    loss_mask=mask,
    advantages=torch.randn(N, generator=g),
    old_logprobs=torch.full((N, S), -4.0),
)
with strict_collectives() as checked:
    metrics = actor.policy_step(
        [mb],
        PolicyLossConfig(),
        temperature=1.0,
        global_num_tokens=4 * 15,
        global_num_seqs=4,
        kl_coef=0.0,
        eps=(0.2, 0.2),
    )
assert metrics["grad_norm"] > 0, metrics
sys.stdout.write(f"CHECKED {len(checked)} {sorted({n for n, _ in checked})}\n")  # one write per line
sys.stdout.flush()
exit_cleanly(0)
