"""Per-token values to one scalar: the aggregation modes of the policy loss, and per-sequence means.

Split from `algo/loss.py` (which re-exports both functions): the sums here add up over any partition
of the global batch, so dividing by *global* counts (passed in) makes the loss independent of the
micro-batch and data-parallel layout. Sequences are rows, or the `seq_ids` of packed rows.
"""

from typing import Literal, get_args

import torch

__all__ = ["AggMode", "GlobalCount", "aggregate", "sequence_mean"]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GlobalCount = int | torch.Tensor


def _check_global_count(name: str, count: GlobalCount | None) -> None:
    # Tensor counts typically come from an all-reduce on the device; checking their value
    # here would force a host sync on every micro-batch, so only host numbers are checked.
    if isinstance(count, (int, float)) and not count > 0:
        raise ValueError(f"{name} must be > 0, got {count}")


def aggregate(
    per_token: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T], nonzero = valid token
    mode: AggMode,
    *,
    global_num_tokens: GlobalCount | None = None,
    global_num_seqs: GlobalCount | None = None,
    seq_ids: torch.Tensor | None = None,  # [N, T] int: which sequence a token belongs to (packing)
    norm_tokens: int | None = None,
) -> torch.Tensor:  # 0-dim
    """Reduce per-token values to this micro-batch's share of the global-batch loss.

    With `m` the mask and `len_i = sum_t m[i, t]`:

    * `token-mean`: `sum_{i,t} l*m / global_num_tokens`
    * `seq-mean-token-mean`: `sum_i [sum_t l*m / max(len_i, 1)] / global_num_seqs`
    * `seq-mean-token-sum`: `sum_{i,t} l*m / global_num_seqs`
    * `seq-mean-token-sum-norm`: `sum_{i,t} l*m / (norm_tokens * global_num_seqs)`, Dr.GRPO's
      constant normaliser (`norm_tokens` is required in this mode)

    The numerators are sums, so they add up over any partition of the global batch. Dividing by
    the *global* count (tokens or sequences over all micro-batches of the step and all
    data-parallel ranks) therefore makes the sum of the returned values over all micro-batches
    and ranks equal to the loss of the whole batch, whatever the layout. Consequently the
    caller must *sum* gradients over micro-batches and ranks; where the framework averages
    them, it must multiply the loss back by the number of micro-batches times ranks.

    When a global count is None the local one is used, which is right for a single micro-batch
    on one rank: the number of valid tokens (`token-mean`), or the number of rows `N`
    (sequence modes; fully masked rows count, so callers that pad with empty rows should pass
    `global_num_seqs`). Local counts are floored at 1 so that an empty batch gives 0, not NaN.

    Sequences are the rows of `[N, T]` unless `seq_ids` is given (a packed batch: several
    sequences per row). Then `seq_ids[i, t]` numbers the sequence of token `(i, t)` from 0 in
    this micro-batch; values under `mask == 0` are ignored, and the local sequence count is
    `max(seq_ids) + 1`. `token-mean` does not need it.
    """
    if per_token.ndim != 2 or mask.shape != per_token.shape:
        raise ValueError(
            f"per_token must be 2-D [N, T] and mask of the same shape, "
            f"got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    _check_global_count("global_num_tokens", global_num_tokens)
    _check_global_count("global_num_seqs", global_num_seqs)
    mask = mask.bool()
    masked = torch.where(mask, per_token, 0.0)

    if mode == "token-mean":
        num_tokens = mask.sum().clamp(min=1) if global_num_tokens is None else global_num_tokens
        return masked.sum() / num_tokens
    if mode not in get_args(AggMode):
        raise ValueError(f"mode must be one of {get_args(AggMode)}, got {mode!r}")
    if mode == "seq-mean-token-sum-norm" and not (isinstance(norm_tokens, int) and norm_tokens >= 1):
        raise ValueError(f"mode {mode!r} needs norm_tokens >= 1 (the generation budget), got {norm_tokens!r}")
    if seq_ids is None:
        per_seq = masked.sum(dim=1)  # [N]
        lengths = mask.sum(dim=1)
        local_seqs = max(per_token.shape[0], 1)
    else:
        if seq_ids.shape != mask.shape:
            raise ValueError(
                f"seq_ids must have the shape of per_token {tuple(mask.shape)}, got {tuple(seq_ids.shape)}"
            )
        # A sequence has at least one token, so every id is below numel(): no host sync for the count.
        ids = torch.where(mask, seq_ids, 0).flatten().long()
        per_seq = masked.new_zeros(masked.numel()).index_add(0, ids, masked.flatten())
        lengths = mask.new_zeros(mask.numel(), dtype=masked.dtype).index_add(0, ids, mask.flatten().to(masked.dtype))
        local_seqs = int(seq_ids.max()) + 1 if global_num_seqs is None else 1
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / lengths.clamp(min=1)
    num_seqs = local_seqs if global_num_seqs is None else global_num_seqs
    if mode == "seq-mean-token-sum-norm":
        assert norm_tokens is not None  # checked above
        return per_seq.sum() / (num_seqs * norm_tokens)
    return per_seq.sum() / num_seqs


def sequence_mean(
    values: torch.Tensor,  # [N, T]
    mask: torch.Tensor,  # [N, T] bool
    seq_ids: torch.Tensor | None = None,  # [N, T] packed rows: sequence of each token
) -> torch.Tensor:  # [N, T]
    """Each valid token gets the mean of `values` over its sequence's valid tokens; 0 elsewhere.

    Sequences are the rows, or the `seq_ids` of a packed batch (as in `aggregate`). Differentiable:
    token t's gradient reaches every token of its sequence, with weight 1 / length.
    """
    masked = torch.where(mask, values, 0.0)
    if seq_ids is None:
        per_seq = masked.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.where(mask, per_seq.expand_as(values), 0.0)
    ids = torch.where(mask, seq_ids, 0).flatten().long()
    sums = masked.new_zeros(masked.numel()).index_add(0, ids, masked.flatten())
    lengths = masked.new_zeros(masked.numel()).index_add(0, ids, mask.flatten().to(masked.dtype))
    per_token = (sums / lengths.clamp(min=1)).gather(0, ids).view_as(values)
    return torch.where(mask, per_token, 0.0)
