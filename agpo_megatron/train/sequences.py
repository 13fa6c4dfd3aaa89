"""The batch types the training step passes around: `Sequences` (a flat batch of completions) and
`MicroBatchPlan` (which sequences share one micro-batch). `batch` and `packing` both build on them."""

from __future__ import annotations

import dataclasses

import torch


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
    trained: list[bool] | None = None
    """Per row: False keeps the response out of the loss (no token in `loss_mask`, not counted in the
    loss normalisers), e.g. a truncated one under algo.overlong.filter. None = all trained."""
    routed_experts: list[torch.Tensor] | None = None
    """MoE, algo.routing_replay=r3: per row, the experts the rollout engine routed each token to,
    `[n, L, K]` (n <= the row's tokens, from its first; L MoE layers, top-K), which the trainer's
    forwards replay (models/routing.py); None = no record."""

    def __len__(self) -> int:
        return len(self.tokens)

    def is_trained(self, i: int) -> bool:
        return self.trained is None or self.trained[i]

    def num_response_tokens(self) -> int:
        """Response tokens of the rows that are trained: the loss's token count."""
        return sum(len(t) - p for i, (t, p) in enumerate(zip(self.tokens, self.prompt_lens)) if self.is_trained(i))

    def num_trained(self) -> int:
        """Rows that are trained: the seq-mean-* modes' sequence count."""
        return len(self) if self.trained is None else sum(self.trained)

    def select(self, idx: range | list[int]) -> Sequences:
        idx = list(idx)
        return Sequences(
            tokens=[self.tokens[i] for i in idx],
            prompt_lens=[self.prompt_lens[i] for i in idx],
            advantages=self.advantages[idx],
            rollout_logprobs=None if self.rollout_logprobs is None else [self.rollout_logprobs[i] for i in idx],
            trained=None if self.trained is None else [self.trained[i] for i in idx],
            routed_experts=None if self.routed_experts is None else [self.routed_experts[i] for i in idx],
        )


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    """Which sequences go where in one micro-batch, before any tensor exists."""

    rows: list[list[int]]
    """Sequence indices per row (one each when padded; several, back to back, when packed)."""
    shape: tuple[int, int]
    """[rows, tokens per row] of the micro-batch's tensors (empty rows fill a fixed shape)."""

    @property
    def computed_tokens(self) -> int:
        return self.shape[0] * self.shape[1]


def place_routed_experts(
    records: list[torch.Tensor], spans: list[tuple[int, int, int]], shape: tuple[int, int]
) -> dict[int, torch.Tensor]:
    """A micro-batch's routing record `{layer: [R, S, K]}` (models/routing.py) from per-sequence
    records `[n, L, K]`, record `i` placed at row `r`, from token offset `o`, for each `(i, r, o)` in
    `spans`; -1 (no record: free routing) everywhere else, e.g. on padding."""
    n_layers, k = records[0].shape[1:]  # the same for every sequence
    out = torch.full((n_layers, *shape, k), -1, dtype=torch.int32)
    for i, r, o in spans:
        rec = torch.as_tensor(records[i])
        if o + len(rec) > shape[1]:
            raise ValueError(f"routing record of {len(rec)} tokens at offset {o} exceeds the row length {shape[1]}")
        out[:, r, o : o + len(rec)] = rec.transpose(0, 1).to(torch.int32)
    return {layer: out[layer] for layer in range(n_layers)}
