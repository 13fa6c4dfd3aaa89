"""The checkpoint format: Megatron dist_checkpointing storage, the agpo_meta.json sidecar and its
checksums, atomic step folders, the converters' reader and writer. Knows nothing of training;
may import models/ and below; train/, bridge/ and the converters use it.
"""


class CheckpointError(ValueError):
    """A missing, truncated or inconsistent checkpoint file; the message names file and tensor."""
