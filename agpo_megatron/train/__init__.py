"""The training loop and what it drives: the Actor and Reference, the PPO step, batches and packing,
the memory hand-overs with vLLM, supervised warm-start, and the run checkpointer (Actor + sampler state).
May import every package below it; only demo/ and cli.py import it.
"""
