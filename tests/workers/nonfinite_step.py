"""2-rank worker (DP=2): a NaN in one rank's micro-batch skips the step on every rank (issue 11).

Prints "RESULT <rank> <key>=<value> ..." lines that tests/runtime/test_nonfinite.py checks.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.nonfinite import NonFiniteError
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from agpo_megatron.train.policy import Actor
from tests.workers.actor_config import actor_config

hf_dir = Path(sys.argv[1])
cfg = actor_config(hf_dir, algo=AlgoConfig(max_bad_steps=1))
arch = read_arch(hf_dir)
layout = init_model_parallel(1, 1, seed=3)
rank = layout.rank
actor = Actor(arch, cfg, layout, total_steps=10)
g = torch.Generator().manual_seed(rank)
N, S = 2, 24
tokens = torch.randint(0, arch.vocab_size, (N, S), generator=g)
mask = torch.zeros(N, S)
mask[:, 5:20] = 1.0


def say(line: str) -> None:
    """One write per line: print() may split text and newline, and two ranks share the pipe."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def step(nan_on_rank0: bool):
    adv = torch.randn(N, generator=g)
    if nan_on_rank0 and rank == 0:
        adv[1] = float("nan")
    mb = dict(
        tokens=tokens,
        targets=torch.roll(tokens, -1, 1),
        loss_mask=mask,
        advantages=adv,
        old_logprobs=torch.full((N, S), -4.0),
    )
    return actor.policy_step(
        [mb],
        PolicyLossConfig(),
        temperature=1.0,
        global_num_tokens=4 * 15,
        global_num_seqs=4,
        kl_coef=0.0,
        eps=(0.2, 0.2),
    )


def weights():
    return {n: p.detach().clone() for n, p in actor.model.named_parameters()}


w0 = weights()
m = step(False)
w1 = weights()
moved = any(not torch.equal(w0[n], w1[n]) for n in w0)
say(f"RESULT {rank} good_skipped={m['update_skipped']} moved={int(moved)}")

sched = actor.scheduler.num_steps
m = step(True)
w2 = weights()
unchanged = all(torch.equal(w1[n], w2[n]) for n in w1)
say(
    f"RESULT {rank} bad_skipped={m['update_skipped']} nonfinite={m['nonfinite_step']} unchanged={int(unchanged)} "
    f"sched_same={int(actor.scheduler.num_steps == sched)}"
)

try:
    step(True)  # a second bad step in a row with max_bad_steps=1
    say(f"RESULT {rank} second_bad=continued")
except NonFiniteError as e:
    say(f"RESULT {rank} second_bad=stopped stop_msg={'max_bad_steps=1' in str(e)}")

if rank == 1:
    with torch.no_grad():
        next(actor.model.parameters())[0] = float("inf")
try:
    actor.check_finite("a test save")
    say(f"RESULT {rank} weights=accepted")
except NonFiniteError as e:
    say(f"RESULT {rank} weights=refused refuse_msg={'before a test save' in str(e)}")
dist.barrier()
exit_cleanly(0)
