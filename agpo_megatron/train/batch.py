"""From sampled completions to Megatron micro-batches: padded (one sequence per row) or packed.

Per-token convention (shared with models/forward.py): in a `[B, S]` tensor, position t belongs to
the prediction of `tokens[:, t + 1]`, so a response of R tokens after a prompt of L tokens owns
positions L-1 .. L+R-2 of `loss_mask`.

Every rank holds the whole global batch (the rollout gathers it), so counts such as the global
number of response tokens are computed locally, with no collective, and are identical everywhere;
so are the assignment of sequences to data-parallel ranks (`balance_dp`) and the padding
statistics (`padding_stats`). Packing itself lives in train/packing.py.
"""

from __future__ import annotations

import dataclasses

import torch

from agpo_megatron.train.sequences import MicroBatchPlan, Sequences, place_routed_experts


def pad_multiple(*, tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """The multiple every micro-batch's sequence length is padded to, for this layout.

    NOTE (issue 8 D5): 8 keeps GEMM shapes tensor-core friendly. Sequence parallelism splits the
    sequence dimension across the TP ranks, so the length must divide by TP, and each shard's
    rows by 8 again. FP8 GEMMs in Transformer Engine need the token dimension of every GEMM (per
    TP shard with sequence parallelism) divisible by 16.
    """
    per_shard = 16 if fp8 else 8
    return per_shard * (tp if sequence_parallel else 1)


def to_micro_batch(seqs: Sequences, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to `seq_len` and build the per-token tensors of one micro-batch."""
    n = len(seqs)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_len)
    rollout_lp = torch.zeros(n, seq_len)
    seq_index = torch.arange(n)
    for i, (toks, plen) in enumerate(zip(seqs.tokens, seqs.prompt_lens)):
        if len(toks) > seq_len:
            raise ValueError(f"sequence of {len(toks)} tokens exceeds seq_len {seq_len}")
        tokens[i, : len(toks)] = torch.tensor(toks)
        loss_mask[i, plen - 1 : len(toks) - 1] = float(seqs.is_trained(i))
        if seqs.rollout_logprobs is not None:
            lp = seqs.rollout_logprobs[i]
            rollout_lp[i, plen - 1 : plen - 1 + len(lp)] = torch.tensor(lp)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = pad_id
    mb = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "advantages": seqs.advantages.float(),
        "seq_index": seq_index,
    }
    if seqs.rollout_logprobs is not None:
        mb["rollout_logprobs"] = rollout_lp
    if seqs.routed_experts is not None:
        mb["routed_experts"] = place_routed_experts(seqs.routed_experts, [(i, i, 0) for i in range(n)], (n, seq_len))
    return mb


def balance_dp(lengths: list[int], dp: int) -> list[list[int]]:
    """Indices of the sequences each data-parallel rank trains: equal counts, balanced tokens.

    NOTE: a contiguous slice per rank leaves one rank with the step's long tail and the others
    waiting for it at the gradient all-reduce. Longest first, each sequence goes to the rank with
    the fewest tokens that still has room for another sequence (LPT under a cardinality limit):
    the heaviest rank ends within one sequence's length of the mean. Counts stay equal (`len /
    dp` each), so the count-based micro-batch split and its pipeline shapes are unchanged. The
    loss divides by the global counts (passed in), so which rank trains what cannot change it.
    Each rank's indices come back in ascending order. Deterministic: every rank gets the same.
    """
    if len(lengths) % dp:
        raise ValueError(f"{len(lengths)} sequences do not split evenly over {dp} data-parallel ranks")
    cap = len(lengths) // dp
    ranks: list[list[int]] = [[] for _ in range(dp)]
    load = [0] * dp
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(dp) if len(ranks[r]) < cap), key=lambda r: (load[r], r))
        ranks[r].append(i)
        load[r] += lengths[i]
    return [sorted(r) for r in ranks]


def plan_micro_batches(
    lengths: list[int],
    *,
    micro_batch_size: int,
    max_tokens: int | None,
    uniform_length: bool,
    pad_to_multiple: int = 8,
    packing: bool = False,
    width: int | None = None,
) -> list[MicroBatchPlan]:
    """The micro-batches of one rank's sequences (token counts `lengths`), padded or packed.

    Padded: by count, or by a padded-token budget (dynamic batch size). With `uniform_length`
    (required when PP > 1: the pipeline exchanges activations of one fixed shape between stages)
    every micro-batch is padded to the step's longest sequence. Otherwise the dynamic mode sorts
    rows by length and fills each micro-batch up to `max_tokens` padded tokens.
    Packed: see `packing.plan_packed`.
    `width` (padded only): every micro-batch is padded to this length (at least the longest here),
    the same on every rank that is given it (expert parallelism, `split_mini_batches`).
    """
    if packing:
        from agpo_megatron.train.packing import plan_packed

        return plan_packed(
            lengths,
            micro_batch_size=micro_batch_size,
            max_tokens=max_tokens,
            fixed_shape=uniform_length,
            pad_to_multiple=pad_to_multiple,
        )

    def padded(n: int) -> int:
        return -(-n // pad_to_multiple) * pad_to_multiple

    order = list(range(len(lengths)))
    longest_all = padded(max(lengths))
    if width is not None:
        uniform_length, longest_all = True, max(longest_all, padded(width))
    if max_tokens is None:
        groups = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    else:
        if not uniform_length:
            order.sort(key=lambda i: lengths[i])
        groups, cur = [], []
        for i in order:
            width = longest_all if uniform_length else padded(lengths[i])  # sorted: i is the longest
            if width > max_tokens:
                raise ValueError(
                    f"batch.max_tokens_per_micro_batch={max_tokens} is below one padded sequence ({width})"
                )
            if cur and (len(cur) + 1) * width > max_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
    return [
        MicroBatchPlan(
            rows=[[i] for i in g], shape=(len(g), longest_all if uniform_length else padded(max(lengths[i] for i in g)))
        )
        for g in groups
    ]


def split_micro_batches(
    seqs: Sequences,
    *,
    micro_batch_size: int,
    max_tokens: int | None,
    pad_id: int,
    uniform_length: bool,
    pad_to_multiple: int = 8,
    packing: bool = False,
    width: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The micro-batch tensors of `plan_micro_batches` (packed ones: `packing.to_packed_micro_batch`)."""
    plans = plan_micro_batches(
        [len(t) for t in seqs.tokens],
        micro_batch_size=micro_batch_size,
        max_tokens=max_tokens,
        uniform_length=uniform_length,
        pad_to_multiple=pad_to_multiple,
        packing=packing,
        width=width,
    )
    if packing:
        from agpo_megatron.train.packing import to_packed_micro_batch

        return [to_packed_micro_batch(seqs, p, pad_id) for p in plans]
    return [to_micro_batch(seqs.select([r[0] for r in p.rows]), p.shape[1], pad_id) for p in plans]


def padding_stats(lengths: list[int], ranks: list[list[int]], **plan_kw) -> dict[str, float]:
    """Real tokens / computed tokens of the whole step, over every data-parallel rank.

    Pure (every rank holds the whole batch and plans every rank's micro-batches the same way), so
    it needs no collective. The same micro-batches go through the log-prob passes and the update,
    so one number describes both. `plan_kw`: `plan_micro_batches`'s keywords.
    """
    real = sum(lengths[i] for r in ranks for i in r)
    computed = sum(p.computed_tokens for r in ranks for p in plan_micro_batches([lengths[i] for i in r], **plan_kw))
    return {
        "batch/real_tokens": float(real),
        "batch/computed_tokens": float(computed),
        "batch/padding_efficiency": real / max(computed, 1),
    }


@dataclasses.dataclass
class MiniBatch:
    """One optimizer step's share of a rollout, as this data-parallel rank sees it."""

    micro_batches: list[dict[str, torch.Tensor]]
    """This rank's micro-batches of the mini-batch."""
    num_tokens: int
    """Trained response tokens of the whole mini-batch over all DP ranks (the loss's token-mean denominator)."""
    num_seqs: int
    """Trained sequences of the whole mini-batch over all DP ranks (the seq-mean-* denominator)."""
    padding: dict[str, float] = dataclasses.field(default_factory=dict)
    """`padding_stats` of the mini-batch over all DP ranks (real and computed tokens)."""


def split_mini_batches(
    seqs: Sequences,
    *,
    seqs_per_update: int,
    dp: int,
    dp_rank: int,
    pad_id: int,
    same_shape_across_dp: bool = False,
    **plan_kw,
) -> list[MiniBatch]:
    """Split a rollout (prompt-major, whole groups of G) into PPO mini-batches, this rank's part of each.

    Mini-batch k is rows `[k * seqs_per_update, (k + 1) * seqs_per_update)`: whole prompt groups when
    `seqs_per_update` is a multiple of G (config validation ensures it). The last one may be shorter
    (a dynamic-sampling step that found fewer groups, train/rollout_rounds.py), a multiple of `dp`
    rows. `balance_dp` deals its rows to the `dp` ranks, and this rank's rows become micro-batches
    (`split_micro_batches(**plan_kw)`).
    The counts are the mini-batch's global ones, computed here with no collective (every rank holds
    the whole rollout), so the loss is the same whatever the DP / micro-batch layout.
    `same_shape_across_dp` (expert parallelism, padded micro-batches): every rank's micro-batches
    are padded to the mini-batch's longest sequence, so all ranks run the same number of forwards
    of one shape, which the expert-parallel token exchange needs (models/build.py `moe_kwargs`).
    """
    if len(seqs) % dp or seqs_per_update % dp:
        raise ValueError(
            f"{len(seqs)} sequences do not split into mini-batches of {seqs_per_update} over {dp} DP ranks"
        )
    out = []
    for lo in range(0, len(seqs), seqs_per_update):
        mini = seqs.select(range(lo, min(lo + seqs_per_update, len(seqs))))
        lengths = [len(t) for t in mini.tokens]
        ranks = balance_dp(lengths, dp)  # equal counts, balanced tokens
        if same_shape_across_dp:
            plan_kw = {**plan_kw, "width": max(lengths)}
        out.append(
            MiniBatch(
                split_micro_batches(mini.select(ranks[dp_rank]), pad_id=pad_id, **plan_kw),
                # Trained rows only (algo.overlong.filter); at least 1, so an all-masked one divides 0 by 1.
                max(mini.num_response_tokens(), 1),
                max(mini.num_trained(), 1),
                padding_stats(lengths, ranks, **plan_kw),
            )
        )
    return out


def padding_summary(minis: list[MiniBatch]) -> dict[str, float]:
    """The rollout's padding statistics: real and computed tokens summed over its mini-batches."""
    real = sum(m.padding["batch/real_tokens"] for m in minis)
    computed = sum(m.padding["batch/computed_tokens"] for m in minis)
    return {
        "batch/real_tokens": real,
        "batch/computed_tokens": computed,
        "batch/padding_efficiency": real / max(computed, 1.0),
    }
