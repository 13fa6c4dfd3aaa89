"""What the trainer needs from a rollout engine: token ids in, sampled completions out, new weights in.

The trainer talks to a `RolloutEngine` only; `vllm_engine.VLLMEngine` is the implementation.
Prompts and completions are token ids: tokenization and chat templates belong to the data
pipeline, so an engine never decides what the policy sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch


@dataclasses.dataclass(kw_only=True, frozen=True)
class SamplingConfig:
    """How to sample one generate() call. Validated on construction."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy. The trainer must use the same value for its log-probs."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    max_new_tokens: int = 1024
    """Longest completion, in tokens."""
    seed: int = 0
    """Base seed of this call. Each prompt derives its own seed from it and its global index, so
    the samples do not depend on how prompts are split across replicas. Vary it per RL step."""
    logprobs: bool = False
    """Return the log-prob of every sampled token (engines may return them anyway, see
    `VLLMEngine`'s `logprob_mode`)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end a completion (the tokenizer's EOS always does)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(kw_only=True)
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    """Index of its prompt in the global prompt list passed to generate()."""
    token_ids: list[int]
    """Generated tokens only (the prompt is not repeated), EOS included when it was sampled."""
    logprobs: list[float] | None
    """log p(token_ids[t] | prompt, token_ids[:t]) under the distribution it was sampled from
    (temperature applied), one per token; None when not requested."""
    text: str
    """Detokenized `token_ids` (may be empty if the engine does not detokenize)."""
    finish_reason: str
    """'stop' (EOS or a stop token) or 'length' (hit max_new_tokens)."""
    weight_version: int | None = None
    """The trainer step the sampling weights come from (None where the engine does not track it); with
    partial rollouts, the newest of `token_versions` (the weights that finished the response)."""
    token_versions: list[int] | None = None
    """The weight version that sampled each token (partial rollouts, rollout/partial.py; None where one
    version sampled the whole response)."""
    routed_experts: torch.Tensor | None = None  # [n, L, K]
    """MoE, when asked for (algo.routing_replay=r3): the experts each of the n tokens of prompt +
    completion that the engine ran through the model was routed to, per MoE layer (top-K); None
    otherwise."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A sampler that the trainer refreshes with the actor's weights every step.

    All methods are collective in SPMD engines: every rank of the job calls them, in the same
    order, with the same arguments.
    """

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        """`n` completions for each prompt; result[i] belongs to prompts[i] (the global list)."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace every weight with full (unsharded) HF-named tensors; consumed lazily, once."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory for training (no-op where unsupported)."""
        ...

    def wake_weights(self) -> None:
        """Bring the weight memory back (before update_weights); no-op where unsupported."""
        ...

    def wake_kv_cache(self) -> None:
        """Bring the KV cache back (after update_weights, before generate); no-op where unsupported."""
        ...


def model_stop_token_ids(hf_path: str, tokenizer_eos_id: int | None) -> tuple[int, ...]:
    """Every token that ends a turn for this model: the tokenizer's EOS and all of
    `generation_config.json`'s `eos_token_id` (an int or a list).

    NOTE (issue 10): chat models end a turn on a token that is not the tokenizer's EOS
    (Qwen2.5-Math: `<|im_end|>` besides `<|endoftext|>`). Sampling past it inflates response
    lengths, and with them the AGPO length reward.
    """
    import json
    from pathlib import Path

    ids = [] if tokenizer_eos_id is None else [int(tokenizer_eos_id)]
    path = Path(hf_path, "generation_config.json")
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return tuple(dict.fromkeys(ids))  # ordered, unique
