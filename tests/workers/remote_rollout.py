"""3-rank worker: world ranks 0-1 train (a trainer world of 2), world rank 2 rolls out (a fake engine).

argv: OUT_DIR MODE   (MODE: ok | dead: the rollout rank dies after its first answer | hung: it
stops answering after its first answer, alive)

No Megatron, no vLLM: the link's protocol alone (runtime/placement.py, rollout/remote.py). Each
rank writes OUT_DIR/rank{r}.json with what it saw; the test compares.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.remote import RemoteRollout, serve
from agpo_megatron.runtime.placement import LinkError, split_world

out_dir, mode = Path(sys.argv[1]), sys.argv[2]
place = split_world(1, timeout_s=60)
rank = place.world_rank


def weights(scale: float) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        ("a.weight", torch.randn(3, 5, generator=g) * scale),  # 60 bytes
        ("b.weight", (torch.randn(7, generator=g) * scale).to(torch.bfloat16)),  # 14 bytes
        ("c.bias", torch.arange(4, dtype=torch.int64)),  # 32 bytes
        ("d.weight", torch.randn(2, 2, 2, generator=g) * scale),  # 32 bytes
    ]


class FakeEngine:
    """Records every weight it gets (exact bytes as lists) and answers generate from the seed."""

    def __init__(self):
        self.weights_version = 0
        self.loads: list[dict] = []

    def update_weights(self, stream):
        self.loads.append({name: [str(t.dtype), list(t.shape), t.float().flatten().tolist()] for name, t in stream})

    def generate(self, prompts, n, sampling, seeds=None, fresh_cache=True):
        if seeds is not None:  # a partial rollout's segment: one token; prompt [7] ends, others run on
            return [
                [
                    Completion(
                        prompt_index=i,
                        token_ids=[seeds[i] % 97],
                        logprobs=[-0.5],
                        text="",
                        finish_reason="stop" if p[0] == 7 else "length",
                    )
                ]
                for i, p in enumerate(prompts)
            ]
        if mode == "dead" and getattr(self, "answered", False):
            os._exit(3)  # dies holding the trainer's next request
        if mode == "hung" and getattr(self, "answered", False):
            time.sleep(120)  # alive, silent: only the link's step timeout can tell
        self.answered = True
        return [
            [Completion(prompt_index=i, token_ids=[*p, sampling.seed + j], logprobs=None, text="", finish_reason="")]
            for i, p in enumerate(prompts)
            for j in range(n)
        ]


result: dict = {"role": place.role, "side_rank": place.side_rank, "side_world": dist.get_world_size()}
if place.role == "rollout":
    engine = FakeEngine()
    result["served"] = serve(engine, place.link, step_timeout_s=5)
    result["loads"] = engine.loads
else:
    remote = RemoteRollout(place.link, bucket_bytes=64, step_timeout_s=5)  # 64 B: a, then b+c... buckets
    remote.weights_version = 0
    remote.update_weights(iter(weights(1.0)))
    s = SamplingConfig(seed=11, max_new_tokens=4)
    first = remote.generate([[1, 2], [3]], 1, s)
    result["first"] = [[c.token_ids, c.weight_version] for g in first for c in g]
    remote.weights_version = 1
    remote.update_weights(iter(weights(2.0)))
    remote.update_weights(iter(weights(3.0)))  # same version again (a save's hand-back): nothing is sent
    if mode in ("dead", "hung"):
        t0 = time.monotonic()
        try:
            remote.generate([[5]], 1, s)
            result["error"] = None
        except LinkError as e:
            result["error"] = str(e)
        result["waited_s"] = time.monotonic() - t0
    else:
        remote.submit([[4, 4]], 1, SamplingConfig(seed=12, max_new_tokens=4))
        try:
            remote.update_weights(iter(weights(4.0)))
        except RuntimeError as e:
            result["refused"] = str(e)
        second = remote.collect()
        result["second"] = [[c.token_ids, c.weight_version] for g in second for c in g]
        # Partial rollouts over the link: both trainer ranks get the complete group and the pool's counts.
        remote.submit_partial(
            ["k0", "k1"], [[7], [8]], 1, SamplingConfig(seed=5, max_new_tokens=3), want=1, segment_tokens=1
        )
        answer, counts = remote.collect()
        result["partial"] = [[k, [[c.token_ids, c.token_versions, c.logprobs] for c in g]] for k, g in answer], counts
        remote.close()
(out_dir / f"rank{rank}.json").write_text(json.dumps(result))
sys.stdout.flush()
os._exit(0)
