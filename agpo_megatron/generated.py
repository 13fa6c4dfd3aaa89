"""Inputs a config can name instead of a path: built on the fly by this repo's own generators.

    model.hf_path: tiny:qwen2                        # the CPU demo's tiny model + arithmetic tokenizer
    data.train.path: synthetic:arith?n=512&seed=0    # the demo's synthetic arithmetic rows
    data.eval.path: synthetic:arith?n=16&seed=1

`resolve(data)` rewrites such specs in a raw config dict into directories/files under a cache
(`$AGPO_CACHE_DIR`, else `$XDG_CACHE_HOME/agpo`, else `~/.cache/agpo`), so a config with them runs
from a fresh clone with no preparation step, and `agpo check` validates it like any other.

Rank safety: every rank of a job calls this before the process group exists. Generation is
deterministic (seeded), each process writes into its own temporary directory and renames it into
place; a rename onto an existing entry loses, and the loser drops its copy. So concurrent ranks,
nodes without a shared home, and a crash half-way all leave either nothing or a complete entry. A
file lock (same host, same cache) just saves the other ranks the duplicate work.

Synthetic rows carry `level` (= difficulty + 1), so evaluation reports pass@1 and tokens per level
when the dataset lists `metadata_fields: [level]`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from agpo_megatron.config_io import ConfigError

GENERATOR_VERSION = 1
"""Bump when a generator's output changes, so stale cache entries are not reused."""

TINY_TYPES = ("qwen2", "qwen3", "llama")
SYNTHETIC_TASKS = ("arith",)
_ARITH_DEFAULTS = {"n": 4000, "seed": 0, "max_difficulty": 1}


def cache_root() -> Path:
    if os.environ.get("AGPO_CACHE_DIR"):
        return Path(os.environ["AGPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agpo"


def write_tiny_model(out: Path, model_type: str = "qwen2", *, seed: int = 0) -> Path:
    """The demo's tiny model (4 layers, hidden 128, head dim 32) with the arithmetic tokenizer."""
    from agpo_megatron.data import synthetic
    from agpo_megatron.models.tiny import save_tiny_hf_model

    tok = synthetic.build_tokenizer(out)
    return save_tiny_hf_model(
        out,
        model_type,
        seed=seed,
        tokenizer=tok,
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def write_arith(path: Path, *, n: int, seed: int, max_difficulty: int) -> Path:
    from agpo_megatron.data import synthetic

    rows = synthetic.make_dataset(n, seed=seed, max_difficulty=max_difficulty)
    return synthetic.write_jsonl(({**r, "level": r["difficulty"] + 1} for r in rows), path)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _materialize(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_root()/name`, built by `build(tmp_dir)` unless a complete entry already exists."""
    root = cache_root()
    final = root / name
    if final.exists():
        return final
    with _lock(root / f".{name}.lock"):
        if final.exists():  # another rank built it while we waited
            return final
        tmp = root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # another node (shared cache, no common lock) won the rename
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _key(*parts: Any) -> str:
    return hashlib.sha1(repr((GENERATOR_VERSION, *parts)).encode()).hexdigest()[:10]


def resolve_model(spec: str, field: str = "model.hf_path") -> str:
    """`tiny:<model_type>` -> a cached HF directory; any other value is returned unchanged."""
    if not spec.startswith("tiny:"):
        return spec
    model_type = spec.removeprefix("tiny:")
    if model_type not in TINY_TYPES:
        raise ConfigError(f"{field}: {spec!r}: unknown tiny model type (one of {list(TINY_TYPES)})")
    return str(_materialize(f"tiny-{model_type}-{_key(model_type)}", lambda d: write_tiny_model(d, model_type)))


def resolve_dataset(spec: str, field: str = "data.train.path") -> str:
    """`synthetic:arith[?n=..&seed=..&max_difficulty=..]` -> a cached .jsonl; others unchanged."""
    if not spec.startswith("synthetic:"):
        return spec
    task, _, query = spec.removeprefix("synthetic:").partition("?")
    if task not in SYNTHETIC_TASKS:
        raise ConfigError(f"{field}: {spec!r}: unknown synthetic task (one of {list(SYNTHETIC_TASKS)})")
    params = dict(_ARITH_DEFAULTS)
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in params:
            raise ConfigError(f"{field}: {spec!r}: unknown parameter {key!r} (accepted: {sorted(params)})")
        try:
            params[key] = int(value)
        except ValueError:
            raise ConfigError(f"{field}: {spec!r}: {key} must be an integer, got {value!r}") from None
    if params["n"] < 1 or not 0 <= params["max_difficulty"] <= 2:
        raise ConfigError(f"{field}: {spec!r}: needs n >= 1 and max_difficulty in [0, 2]")
    name = f"{task}-n{params['n']}-s{params['seed']}-d{params['max_difficulty']}-{_key(task, sorted(params.items()))}"
    entry = _materialize(name, lambda d: write_arith(d / "data.jsonl", **params))
    return str(entry / "data.jsonl")


def resolve(data: dict[str, Any]) -> None:
    """Rewrite generated-input specs in a raw config dict (in place), before validation."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("hf_path"), str):
        model["hf_path"] = resolve_model(model["hf_path"])
    datasets = data.get("data")
    if isinstance(datasets, dict):
        for split in ("train", "eval"):
            ds = datasets.get(split)
            if isinstance(ds, dict) and isinstance(ds.get("path"), str):
                ds["path"] = resolve_dataset(ds["path"], f"data.{split}.path")
