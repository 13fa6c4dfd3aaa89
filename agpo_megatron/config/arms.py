"""The named algorithm arms a comparison runs side by side, as dotted config overrides.

One table for everything that compares methods (`examples/sweeps/paper_ablation.py`, the CPU demo's
`--arms`): an arm's overrides set every field that defines its method, so the same arm means the
same method on any base config (a preset, examples/tiny_cpu.yaml, examples/demo_cpu.yaml). They touch
`algo.*` only: the run's model, data, rollout and batch stay the base config's, so arms can share one
warm start and one rollout engine (`Session.for_run` refuses anything else).

Pure data; imports nothing (the sweep script loads it without the training dependencies).
"""

from __future__ import annotations

__all__ = ["ARMS", "arm_overrides", "parse_arms"]

_NO_M2 = ["algo.length_reward=false"]
_PLAIN = ["algo.dynamic_sampling.enabled=false", "algo.overlong.soft_punishment=false", "algo.overlong.filter=false"]

ARMS: dict[str, list[str]] = {
    # The AGPO paper's three methods.
    "grpo": ["algo.advantage=grpo", *_NO_M2, *_PLAIN, "algo.loss.ratio_level=token"],
    "agpo-m1": ["algo.advantage=agpo", *_NO_M2, *_PLAIN, "algo.loss.ratio_level=token"],
    "agpo": ["algo.advantage=agpo", "algo.length_reward=true", *_PLAIN, "algo.loss.ratio_level=token"],
    # The baselines AGPO is compared against (issue 22).
    # DAPO: dynamic sampling (where AGPO's m1 gives +-1, DAPO samples other prompts), clip-higher,
    # token-level loss, soft overlong punishment (ramp: a fifth of rollout.max_new_tokens), no KL.
    "dapo": [
        "algo.advantage=grpo",
        *_NO_M2,
        "algo.dynamic_sampling.enabled=true",
        "algo.overlong.soft_punishment=true",
        "algo.overlong.filter=false",
        "algo.loss.ratio_level=token",
        "algo.loss.eps_low=0.2",
        "algo.loss.eps_high=0.28",
        "algo.loss.agg_mode=token-mean",
        "algo.loss.kl_coef=0.0",
    ],
    # GSPO: sequence ratio and clip, its paper's clip range, one mean per response.
    "gspo": [
        "algo.advantage=grpo",
        *_NO_M2,
        *_PLAIN,
        "algo.loss.ratio_level=sequence",
        "algo.loss.eps_low=0.0003",
        "algo.loss.eps_high=0.0004",
        "algo.loss.agg_mode=seq-mean-token-mean",
    ],
    "rloo": ["algo.advantage=rloo", *_NO_M2, *_PLAIN, "algo.loss.ratio_level=token"],
    # Dr.GRPO: no std division, token sums over the constant generation budget.
    "drgrpo": [
        "algo.advantage=drgrpo",
        *_NO_M2,
        *_PLAIN,
        "algo.loss.ratio_level=token",
        "algo.loss.agg_mode=seq-mean-token-sum-norm",
    ],
}
"""Arm name -> its overrides, in the order a table lists them."""


def arm_overrides(name: str) -> list[str]:
    """The dotted overrides of arm `name` (a copy); ValueError naming the known arms otherwise."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; known arms: {', '.join(ARMS)}")
    return list(ARMS[name])


def parse_arms(spec: str) -> list[str]:
    """`"grpo,agpo,dapo"` -> the arm names, checked, in the given order, without repeats."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("no arm named: give a comma-separated list, e.g. grpo,agpo,dapo")
    for n in names:
        arm_overrides(n)
    return list(dict.fromkeys(names))
