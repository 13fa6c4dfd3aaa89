"""2-rank worker: a verifier that answers differently on each rank still gives every rank the same
rewards, metrics and advantages once score_distributed shares the verdicts (issue 10.3).

Prints one "RESULT <rank> <json>" line per rank, which tests/data/test_reward_dist.py compares.
"""

import json
import sys

import torch
import torch.distributed as dist

from agpo_megatron.algo.advantages import compute_advantages
from agpo_megatron.data.answer_match import RewardResult, get_default_pool
from agpo_megatron.data.reward_dist import score_distributed
from agpo_megatron.runtime.parallel import comm_device, exit_cleanly, init_distributed


def main() -> None:
    init_distributed(timeout_s=120)
    rank = dist.get_rank()

    def flaky(responses, golds):
        # A check near its deadline: it passes on rank 0 and times out on rank 1.
        return [RewardResult(correct=rank == 0, formatted=True, extracted="x", timed_out=rank == 1) for _ in responses]

    P, G = 3, 4
    texts, golds = [f"\\boxed{{{i}}}" for i in range(P * G)], ["0"] * (P * G)
    r_acc, formatted, metrics = score_distributed(texts, golds, score_fn=flaky)
    adv, _ = compute_advantages(r_acc.view(P, G), "agpo", r_min=0.0, r_max=1.0)  # [P, G]
    redundant = torch.tensor([float(r.correct) for r in flaky(texts, golds)])  # what scoring everything here gives

    # An odd batch (shares of 3 and 2) and the real verifier pool under the budget, spawned from a torchrun rank.
    odd_texts = [r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", "no answer", "#### 7", r"\boxed{3}"]
    odd_golds = [r"\frac{1}{2}", "0.5", "1", "7", "4"]
    odd_acc, odd_formatted, odd_metrics = score_distributed(odd_texts, odd_golds, timeout_s=30, budget_s=60)

    out = {
        "r_acc": r_acc.tolist(),
        "formatted": formatted.tolist(),
        "metrics": metrics,
        "adv": adv.flatten().tolist(),
        "redundant": redundant.tolist(),
        "odd_acc": odd_acc.tolist(),
        "odd_formatted": odd_formatted.tolist(),
        "odd_metrics": odd_metrics,
    }
    # Byte-equality across ranks, checked here too: gather every rank's advantages.
    shards = [torch.empty(P * G, device=comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, adv.flatten().to(comm_device()))
    out["adv_equal_everywhere"] = all(torch.equal(s.cpu(), shards[0].cpu()) for s in shards)
    sys.stdout.write(f"RESULT {rank} {json.dumps(out)}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    get_default_pool().close()  # exit_cleanly skips atexit
    exit_cleanly()


if __name__ == "__main__":  # the verifier pool spawns workers, which re-import this file
    main()
