"""The CPU demo (warm start, then GRPO vs AGPO on a synthetic task) and its multi-seed sweep.
May import any package; only cli.py imports it.
"""
