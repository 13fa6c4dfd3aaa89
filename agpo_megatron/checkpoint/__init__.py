"""Megatron distributed checkpoints; the code moved to `train_state` (split in the next commit)."""

from agpo_megatron.checkpoint.train_state import *  # noqa: F401,F403 (the old module's public names)
