"""Evaluation: pass@1 / pass@n and token tables (per level) through a rollout engine and the training
grader, for the trainer's periodic evaluation, the demo and `agpo eval`.
May import plan/ and below; train/, demo/ and cli.py import it.
"""
