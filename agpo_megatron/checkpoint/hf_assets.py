"""A model's non-weight files (tokenizer, generation_config, chat template), copied beside its weights:
into a checkpoint's `hf_assets/` on save, and back into an HF folder on export."""

from __future__ import annotations

import shutil
from pathlib import Path

from agpo_megatron.models.hf_config import TOKENIZER_SUBDIR

# Weight files and their indexes: never copied as "assets" (other formats of the same weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".partial")


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the source model's non-weight files (tokenizer, generation_config, chat template, ...).

    Skips config.json (written by `bridge.hf_writer.write_hf_config`), weight files and their indexes,
    hidden files and subdirectories (e.g. Llama's `original/` with .pth weights), except a model's own
    tokenizer folder (`tokenizer/`, see `models.hf_config.tokenizer_path`), which is copied whole.
    Returns copied names.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_dir() and f.name == TOKENIZER_SUBDIR:
            shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
            copied.append(f.name)
            continue
        if (
            not f.is_file()
            or f.name.startswith(".")
            or f.name == "config.json"
            or f.name.endswith(_WEIGHT_SUFFIXES)
            or f.name.endswith(".index.json")
        ):
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied
