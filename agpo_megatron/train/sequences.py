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
