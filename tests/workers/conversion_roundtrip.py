"""1-rank worker: HF -> Megatron -> HF through the CLI entry points, for several tiny models.

argv: OUT_DIR NAME=HF_DIR ... Writes OUT_DIR/<name>/mcore (torch_dist) and OUT_DIR/<name>/hf
(exported). The first model is exported with 20 KB shards, so that the sharded + index path runs.
Export with a config that disagrees with the checkpoint must fail; its message goes to
OUT_DIR/mismatch_error.txt.
"""

import sys
from pathlib import Path

from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.runtime.parallel import exit_cleanly
from checkpoints_conversion import hf_to_megatron, megatron_to_hf


def main() -> None:
    out = Path(sys.argv[1])
    models = dict(arg.split("=", 1) for arg in sys.argv[2:])
    for i, (name, hf_dir) in enumerate(models.items()):
        assert hf_to_megatron.main(["--hf-dir", hf_dir, "--out", str(out / name / "mcore")]) == 0
        shard = ["--max-shard-bytes", str(20_000)] if i == 0 else []
        assert megatron_to_hf.main(["--ckpt", str(out / name / "mcore"), "--out", str(out / name / "hf"), *shard]) == 0

    # The first model's checkpoint read with the last model's config.json: shapes differ.
    first, last = list(models)[0], list(models)[-1]
    try:
        megatron_to_hf.convert_megatron_to_hf(out / first / "mcore", out / "mismatch", hf_config_from=models[last])
    except CheckpointError as e:
        (out / "mismatch_error.txt").write_text(str(e))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
