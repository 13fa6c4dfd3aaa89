"""Megatron distributed checkpoints (torch_dist): the trainer's save/resume, and the format the
HF converters read and write.

A checkpoint directory::

    metadata.json        dist_checkpointing backend and version (torch_dist, 1)
    common.pt            non-tensor state, saved by rank 0: step, extra_state, scheduler, optimizer param groups
                         (megatron-core 0.16; 0.19 stores it as the object `common_state` in the .distcp files,
                         so 0.19 reads 0.16's checkpoints but not the reverse)
    .metadata            torch.distributed.checkpoint index: each tensor's global shape, dtype and chunks
    __<rank>_0.distcp    one file per saving rank, holding that rank's chunks
    agpo_meta.json       our sidecar (`CheckpointMeta`): step, HF config.json, source, dtype, layout,
                         and a checksum of every other file (verified before a load reads a tensor)
    hf_assets/           tokenizer and generation_config files of the HF model, for export back to HF

Tensors are keyed the way `model.sharded_state_dict()` keys them: by global name and global shape.
Layers are stacked on a leading axis, and a TP shard is an offset into the full tensor. So a
checkpoint written at one TP/PP loads at any other: torch DCP reads the overlapping parts of the
stored chunks.

The sidecar is written after the tensors, so its presence marks a complete checkpoint. Save to
a fresh directory per step: overwriting a checkpoint in place leaves nothing complete if the job
dies halfway.

One module per concern; import from the module that owns a name:

    metadata       the sidecar (`CheckpointMeta`), and checks of a checkpoint against it and `.metadata`
    train_state    the trainer's `save_checkpoint` / `load_checkpoint`, with the optimizer fixups
    convert_io     the HF converters' API: `abstract_model`, `save_from_source`, `ParamReader`
    storage        the streaming torch_dist writer both save paths share, and error translation
    direct_reader  the reader behind `ParamReader`, down to the zip records of a .distcp file

NOTE: this package module re-exports nothing, so importing `CheckpointError` (the HF reader, the
output-folder helper, the CLI's error list) does not import megatron-core, and `storage` can use
`bridge.hf_writer` without an import cycle.
"""


class CheckpointError(ValueError):
    """A missing, truncated or inconsistent checkpoint file; the message names file and tensor."""
