"""A short supervised warm-start, used by the CPU demo so RL starts from a policy that can answer.

It is this package's own loop on the same Megatron actor (DDP, optimizer, schedule) as RL, with a
token-mean NLL over the solution tokens; the global token count makes it layout-independent.
"""

from __future__ import annotations

import random

import torch

from agpo_megatron.models.forward import vocab_parallel_logprobs
from agpo_megatron.runtime.parallel import Layout, dp_slice
from agpo_megatron.train import batch as batching
from agpo_megatron.train.policy import Actor


def sft(
    actor: Actor,
    pairs: list[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    micro_batch_size: int,
    layout: Layout,
    pad_id: int,
    seed: int = 0,
    log_every: int = 25,
    progress_bar: bool = False,
) -> list[float]:
    """Train on (prompt_ids, solution_ids + eos) pairs; returns the NLL per step (every rank).

    The actor's own optimizer config sets the LR: build a separate warm-start actor.
    `progress_bar`: a tqdm bar on rank 0, on the console stream (`agpo_megatron.report.console`).
    """
    rng = random.Random(seed)  # the same on every rank: each DP rank then takes its own slice
    losses = []
    bar = None
    if progress_bar and layout.rank == 0:
        from tqdm import tqdm

        from agpo_megatron.report.console import console

        bar = tqdm(total=steps, desc="warm start", dynamic_ncols=True, file=console())
    for step in range(steps):
        rows = rng.sample(pairs, batch_size)
        seqs = batching.Sequences(
            tokens=[p + r for p, r in rows], prompt_lens=[len(p) for p, _ in rows], advantages=torch.zeros(len(rows))
        )
        global_tokens = seqs.num_response_tokens()
        mine = seqs.select(dp_slice(len(seqs), layout.dp, layout.dp_rank))
        mbs = batching.split_micro_batches(
            mine,
            micro_batch_size=micro_batch_size,
            max_tokens=None,
            pad_id=pad_id,
            uniform_length=layout.pp > 1,
            pad_to_multiple=actor.pad_multiple,
            # MoE with EP: one shape on every rank (the EP ranks exchange tokens per forward).
            width=max(len(t) for t in seqs.tokens) if layout.ep > 1 else None,
        )

        def nll(logits, mb, global_tokens=global_tokens):  # bound now: called within this step
            lp, _ = vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
            mask = mb["loss_mask"]
            loss = -(lp * mask).sum() / global_tokens
            return loss, {"nll": (-(lp * mask).sum() / mask.sum().clamp(min=1)).detach(), "num_tokens": mask.sum()}

        m = actor.train_step(mbs, nll)
        losses.append(m["nll"])
        if layout.rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"[sft] step {step:4d}  nll {m['nll']:.4f}  grad_norm {m['grad_norm']:.3f}", flush=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{m['nll']:.3g}")
    if bar is not None:
        bar.close()
    return losses
