"""From sampled completions to padded Megatron micro-batches.

Per-token convention (shared with models/forward.py): in a `[B, S]` tensor, position t belongs to
the prediction of `tokens[:, t + 1]`, so a response of R tokens after a prompt of L tokens owns
positions L-1 .. L+R-2 of `loss_mask`.

Every rank holds the whole global batch (the rollout gathers it), so counts such as the global
number of response tokens are computed locally, with no collective, and are identical everywhere.
"""

from __future__ import annotations

import dataclasses

import torch

from agpo_megatron.parallel import dp_slice


@dataclasses.dataclass
class Sequences:
    """A flat batch of prompt+response sequences (one row per completion)."""

    tokens: list[list[int]]
    """prompt + response token ids."""
    prompt_lens: list[int]
    """Prompt length per row."""
    advantages: torch.Tensor  # [N]
    """Per-sequence advantage (broadcast over its response tokens)."""
    rollout_logprobs: list[list[float]] | None = None
    """The engine's per-token log-probs of each response (for logprob_mode=rollout / TIS)."""

    def __len__(self) -> int:
        return len(self.tokens)

    def num_response_tokens(self) -> int:
        return sum(len(t) - p for t, p in zip(self.tokens, self.prompt_lens))

    def select(self, idx: range | list[int]) -> "Sequences":
        idx = list(idx)
        return Sequences(
            tokens=[self.tokens[i] for i in idx],
            prompt_lens=[self.prompt_lens[i] for i in idx],
            advantages=self.advantages[idx],
            rollout_logprobs=None if self.rollout_logprobs is None else [self.rollout_logprobs[i] for i in idx],
        )


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
        loss_mask[i, plen - 1 : len(toks) - 1] = 1.0
        if seqs.rollout_logprobs is not None:
            lp = seqs.rollout_logprobs[i]
            rollout_lp[i, plen - 1 : plen - 1 + len(lp)] = torch.tensor(lp)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = pad_id
    mb = {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "advantages": seqs.advantages.float(), "seq_index": seq_index}
    if seqs.rollout_logprobs is not None:
        mb["rollout_logprobs"] = rollout_lp
    return mb


def split_micro_batches(seqs: Sequences, *, micro_batch_size: int, max_tokens: int | None,
                        pad_id: int, uniform_length: bool, pad_to_multiple: int = 8) -> list[dict[str, torch.Tensor]]:
    """Split into micro-batches by count, or by a padded-token budget (dynamic batch size).

    With `uniform_length` (required when PP > 1: the pipeline exchanges activations of one fixed
    shape between stages) every micro-batch is padded to the step's longest sequence. Otherwise
    the dynamic mode sorts rows by length and packs each micro-batch up to `max_tokens` padded
    tokens, which is where the saving comes from on long-tailed response lengths.
    """
    def padded(n: int) -> int:
        return -(-n // pad_to_multiple) * pad_to_multiple

    order = list(range(len(seqs)))
    if max_tokens is None:
        groups = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    else:
        if not uniform_length:
            order.sort(key=lambda i: len(seqs.tokens[i]))
        longest_all = padded(max(len(t) for t in seqs.tokens))
        groups, cur = [], []
        for i in order:
            width = longest_all if uniform_length else padded(len(seqs.tokens[i]))  # sorted: i is the longest
            if width > max_tokens:
                raise ValueError(f"batch.max_tokens_per_micro_batch={max_tokens} is below one padded sequence ({width})")
            if cur and (len(cur) + 1) * width > max_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
    longest_all = padded(max(len(t) for t in seqs.tokens))
    out = []
    for g in groups:
        sub = seqs.select(g)
        out.append(to_micro_batch(sub, longest_all if uniform_length else padded(max(len(t) for t in sub.tokens)), pad_id))
    return out


@dataclasses.dataclass
class MiniBatch:
    """One optimizer step's share of a rollout, as this data-parallel rank sees it."""

    micro_batches: list[dict[str, torch.Tensor]]
    """This rank's micro-batches of the mini-batch."""
    num_tokens: int
    """Response tokens of the whole mini-batch over all DP ranks (the loss's token-mean denominator)."""
    num_seqs: int
    """Sequences of the whole mini-batch over all DP ranks (the seq-mean-* denominator)."""


def split_mini_batches(seqs: Sequences, *, seqs_per_update: int, dp: int, dp_rank: int,
                       **micro) -> list[MiniBatch]:
    """Split a rollout (prompt-major, whole groups of G) into PPO mini-batches, this rank's part of each.

    Mini-batch k is rows `[k * seqs_per_update, (k + 1) * seqs_per_update)`: whole prompt groups when
    `seqs_per_update` is a multiple of G (config validation ensures it). Its rows are split into
    `dp` contiguous slices, and this rank's slice into micro-batches by `split_micro_batches(**micro)`.
    The counts are the mini-batch's global ones, computed here with no collective (every rank holds
    the whole rollout), so the loss is the same whatever the DP / micro-batch layout.
    """
    if len(seqs) % seqs_per_update or seqs_per_update % dp:
        raise ValueError(f"{len(seqs)} sequences do not split into mini-batches of {seqs_per_update} over {dp} DP ranks")
    out = []
    for lo in range(0, len(seqs), seqs_per_update):
        mini = seqs.select(range(lo, lo + seqs_per_update))
        mine = mini.select(dp_slice(len(mini), dp, dp_rank))
        out.append(MiniBatch(split_micro_batches(mine, **micro), mini.num_response_tokens(), len(mini)))
    return out
