"""Checks that need the filesystem, run by `agpo check` and at the start of `train` (issue 11).

Config validation (`config/schema.py`) checks types and ranges; this checks that what the config names
exists: the model directory and its config.json, the data files, a writable `save_dir` and
`logging.out_dir`, the checkpoint to start from. It runs before any process group, model or
engine exists, so a typo costs milliseconds, not a 15-second start-up (or, for an unwritable
`save_dir`, a whole run whose only save fails at the end).

Paths that name a generator (`tiny:...`, `synthetic:...`) or a hub dataset (`org/name`) are not
files: they are left to their loaders.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import ConfigError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*:(?!//)")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _generated(path: str) -> bool:
    return bool(_SCHEME.match(path)) and not Path(path).exists()


def _looks_local(path: str) -> bool:
    return path.lower().endswith(_LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def _writable_dir(path: str, field: str) -> None:
    """The directory, or its nearest existing ancestor, takes a new file (nothing is left behind)."""
    d = Path(path).expanduser().absolute()
    existing = next(p for p in (d, *d.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{field}={path!r} is not writable ({existing} is not a directory)")
    probe = existing / f".agpo-write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}={path!r} is not writable ({e.strerror or e})") from None


def check_paths(cfg: TrainConfig) -> None:
    """Raise `ConfigError` naming the field for the first missing or unusable path."""
    m = cfg.model
    if not m.hf_path:
        raise ConfigError("model.hf_path is empty: it names the HF model directory (config.json, tokenizer)")
    if not _generated(m.hf_path) and not Path(m.hf_path, "config.json").is_file():
        raise ConfigError(f"model.hf_path={m.hf_path!r}: no config.json there")
    for field, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is None or _generated(ds.path) or not _looks_local(ds.path):
            continue
        p = Path(ds.path).expanduser()
        if not p.is_file():
            raise ConfigError(f"{field}.path={ds.path!r}: no such file")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"{field}.path={ds.path!r}: not readable")
    if m.init_from == "megatron" and not Path(cfg.checkpoint.load_dir or "").is_dir():
        raise ConfigError(f"checkpoint.load_dir={cfg.checkpoint.load_dir!r}: no such checkpoint directory")
    if cfg.checkpoint.save_dir:
        _writable_dir(cfg.checkpoint.save_dir, "checkpoint.save_dir")
    _writable_dir(cfg.logging.out_dir, "logging.out_dir")


def check_data(cfg: TrainConfig) -> list[str]:
    """Load the tokenizer and the data as training will, and return the drop report lines.

    Raises `DatasetError` when a set ends up empty or over `data.max_drop_frac` is dropped.
    """
    from agpo_megatron.data.datasets import load_examples, report_drops
    from agpo_megatron.models.hf_config import load_tokenizer

    if _generated(cfg.model.hf_path):
        return [f"data: not checked (model.hf_path={cfg.model.hf_path!r} is generated at train time)"]
    tokenizer = None
    lines = []
    for field, ds in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if ds is None:
            continue
        if _generated(ds.path) or not _looks_local(ds.path):
            lines.append(f"{field} ({ds.path}): not checked here (generated, or a hub dataset)")
            continue
        tokenizer = tokenizer or load_tokenizer(cfg.model.hf_path)
        _, stats = load_examples(ds, tokenizer)
        lines.append(report_drops(stats, field, ds, cfg.data.max_drop_frac))
    return lines
