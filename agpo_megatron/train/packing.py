"""Sequence packing: several sequences back to back in each row of a micro-batch.

RL batches are ragged (a few long responses, many short ones), and padding every row to the
longest wastes most of the compute on long-tailed lengths. Packing puts sequences back to back in
rows of the step's longest (padded) length, best-fit decreasing, and only the row ends are padded.

A packed micro-batch has the padded one's keys with the same per-token convention (train/batch.py:
position t predicts `tokens[:, t + 1]`), in `[R, S]` (rows x row length), plus:

    advantages   [R, S]  per token (a row holds several sequences)
    position_ids [R, S]  0, 1, ... restarting at every sequence (and on the row's padding)
    seq_ids      [R, S]  which of this micro-batch's sequences a token belongs to, -1 on padding
    seq_index    [K]     index of each of the K sequences in the `Sequences` that was packed
    routed_experts {layer: [R, S, K]}  the rollout's routing record (algo.routing_replay=r3), if any
    cu_seqlens   [M + 1] int32 segment boundaries in the flattened `[1, R * S]` token stream,
                         every row's end padding its own segment (Transformer Engine's THD layout)
    max_seqlen   int     longest segment

How the model keeps sequences apart (models/forward.py): with the Transformer Engine spec the
rows are flattened to THD and `cu_seqlens` go in as `PackedSeqParams`; with the local spec a
block-diagonal causal mask `[R, 1, S, S]` and RoPE at `position_ids` (restarting per sequence).
Each sequence then gets the log-probs it gets alone (tests/models/test_packing_parity.py).

Departures from a padded batch: none in the values. The last position of a sequence has the
target `pad_id` (as when padded), not the next sequence's first token; it is never in the loss.
"""

from __future__ import annotations

import torch

from agpo_megatron.train.sequences import MicroBatchPlan, Sequences, place_routed_experts


def plan_packed(
    lengths: list[int], *, micro_batch_size: int, max_tokens: int | None, fixed_shape: bool, pad_to_multiple: int = 8
) -> list[MicroBatchPlan]:
    """Pack sequences of `lengths` tokens into rows, and rows into micro-batches.

    Rows are `row_len` = the longest sequence rounded up to `pad_to_multiple` tokens, so a row is
    never longer than the padded path's, and neither is its attention (quadratic per row on the
    local spec). Best-fit decreasing: longest first, each into the row it leaves the least room
    in, a new row when none fits. Rows go, fullest first, into micro-batches of at most
    `max_tokens` computed tokens, or `micro_batch_size x row_len` without a token budget (the
    padded path's largest micro-batch, so memory stays within what it needed).
    `fixed_shape` (pipeline parallelism): every micro-batch is `[budget // row_len, row_len]`,
    the last one filled with empty rows.
    """

    def padded(n: int) -> int:
        return -(-n // pad_to_multiple) * pad_to_multiple

    row_len = padded(max(lengths))
    budget = max_tokens if max_tokens is not None else micro_batch_size * row_len
    if row_len > budget:
        raise ValueError(f"batch.max_tokens_per_micro_batch={max_tokens} is below one padded sequence ({row_len})")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: room[r])
            rows[r].append(i)
            room[r] -= lengths[i]
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    by_fill = sorted(range(len(rows)), key=lambda r: (room[r], r))  # fullest first
    if fixed_shape:
        per_mb = budget // row_len
        return [
            MicroBatchPlan(rows=[rows[r] for r in by_fill[j : j + per_mb]], shape=(per_mb, row_len))
            for j in range(0, len(by_fill), per_mb)
        ]
    plans: list[MicroBatchPlan] = []
    cur: list[int] = []
    for r in by_fill:
        width = padded(row_len - room[cur[0]]) if cur else 0  # the first row is the fullest
        if cur and (len(cur) + 1) * width > budget:
            plans.append(MicroBatchPlan(rows=[rows[k] for k in cur], shape=(len(cur), width)))
            cur = []
        cur.append(r)
    plans.append(MicroBatchPlan(rows=[rows[k] for k in cur], shape=(len(cur), padded(row_len - room[cur[0]]))))
    return plans


def to_packed_micro_batch(seqs: Sequences, plan: MicroBatchPlan, pad_id: int) -> dict[str, torch.Tensor]:
    """The tensors of one packed micro-batch (module docstring)."""
    n_rows, seq_len = plan.shape
    tokens = torch.full((n_rows, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((n_rows, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n_rows, seq_len)
    advantages = torch.zeros(n_rows, seq_len)
    rollout_lp = torch.zeros(n_rows, seq_len)
    position_ids = torch.zeros(n_rows, seq_len, dtype=torch.long)
    seq_ids = torch.full((n_rows, seq_len), -1, dtype=torch.long)
    seq_index: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (sequence, row, offset): where its routing record goes
    cu = [0]
    rows = plan.rows + [[] for _ in range(n_rows - len(plan.rows))]
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            toks, plen = seqs.tokens[i], seqs.prompt_lens[i]
            n = len(toks)
            if o + n > seq_len:
                raise ValueError(f"row {r}: sequences of {o + n} tokens exceed the row length {seq_len}")
            tokens[r, o : o + n] = torch.tensor(toks)
            targets[r, o : o + n - 1] = torch.tensor(toks[1:])
            loss_mask[r, o + plen - 1 : o + n - 1] = float(seqs.is_trained(i))
            advantages[r, o : o + n] = seqs.advantages[i].float()
            if seqs.rollout_logprobs is not None:
                lp = seqs.rollout_logprobs[i]
                rollout_lp[r, o + plen - 1 : o + plen - 1 + len(lp)] = torch.tensor(lp)
            position_ids[r, o : o + n] = torch.arange(n)
            seq_ids[r, o : o + n] = len(seq_index)
            seq_index.append(i)
            spans.append((i, r, o))
            o += n
            cu.append(r * seq_len + o)
        if o < seq_len:  # the row's end padding: a segment of its own, positions from 0 again
            position_ids[r, o:] = torch.arange(seq_len - o)
            cu.append((r + 1) * seq_len)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    mb = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "advantages": advantages,
        "position_ids": position_ids,
        "seq_ids": seq_ids,
        "seq_index": torch.tensor(seq_index, dtype=torch.long),
        "cu_seqlens": cu_t,
        "max_seqlen": int((cu_t[1:] - cu_t[:-1]).max()),
    }
    if seqs.rollout_logprobs is not None:
        mb["rollout_logprobs"] = rollout_lp
    if seqs.routed_experts is not None:
        mb["routed_experts"] = place_routed_experts(seqs.routed_experts, spans, (n_rows, seq_len))
    return mb


def unpack(mb: dict[str, torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:  # values [R, S]
    """Per-token `values` of a packed micro-batch, one 1-D tensor per sequence (in `seq_index` order)."""
    seq_ids = mb["seq_ids"].to(values.device)
    return [values[seq_ids == k] for k in range(len(mb["seq_index"]))]


def is_packed(mb: dict) -> bool:
    return "seq_ids" in mb
