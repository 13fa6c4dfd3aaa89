"""2-rank worker: with the process group up, rank 1 alone writes a tiny model (as when it takes the
`tiny:` cache lock first). Argv: OUT_DIR. Rank 1 writes OUT_DIR/files.txt, the folder's listing."""

import sys
from pathlib import Path

import torch.distributed as dist

from agpo_megatron.models.tiny import save_tiny_hf_model
from agpo_megatron.runtime.parallel import exit_cleanly, init_distributed

out = Path(sys.argv[1])
init_distributed()
if dist.get_rank() == 1:
    folder = save_tiny_hf_model(out / "model", "qwen3_moe", hidden_size=64, num_heads=2, head_dim=32, num_layers=1)
    (out / "files.txt").write_text("\n".join(sorted(p.name for p in folder.iterdir())))
exit_cleanly(0)
