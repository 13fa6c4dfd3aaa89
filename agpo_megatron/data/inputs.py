"""Generated datasets a config can name instead of a path, and the cache they are built into.

    data.train.path: synthetic:arith?n=512&seed=0    # the demo's synthetic arithmetic rows
    data.eval.path: synthetic:arith?n=16&seed=1
    data.train.path: synthetic:steps?n=4000&seed=0   # the steps task (data/synthetic_steps.py)
    data.eval.path: synthetic:steps?n=512&seed=0&held_out=1   # no question shared with training

`resolve_dataset(spec)` turns such a spec into a .jsonl under a cache (`$AGPO_CACHE_DIR`, else
`$XDG_CACHE_HOME/agpo`, else `~/.cache/agpo`), so a config with them runs from a fresh clone with no
preparation step. `materialize` is the cache entry builder that `models/inputs.py` shares.

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

GENERATOR_VERSION = 2
"""Bump when a generator's output changes, so stale cache entries are not reused (2: the tiny
model's tokenizer moved into its own folder, `tokenizer/`)."""

SYNTHETIC_TASKS = ("arith", "steps")
_DEFAULTS = {
    "arith": {"n": 4000, "seed": 0, "max_difficulty": 1},
    # held_out=1: the held-out rows; training rows exclude the first n_held_out held-out questions.
    "steps": {"n": 4000, "seed": 0, "held_out": 0, "n_held_out": 512},
}


def cache_root() -> Path:
    if os.environ.get("AGPO_CACHE_DIR"):
        return Path(os.environ["AGPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agpo"


def write_arith(path: Path, *, n: int, seed: int, max_difficulty: int) -> Path:
    from agpo_megatron.data import synthetic

    rows = synthetic.make_dataset(n, seed=seed, max_difficulty=max_difficulty)
    return synthetic.write_jsonl(({**r, "level": r["difficulty"] + 1} for r in rows), path)


def write_steps(path: Path, *, n: int, seed: int, held_out: int, n_held_out: int) -> Path:
    from agpo_megatron.data import synthetic, synthetic_steps

    train, held = synthetic_steps.make_split(0 if held_out else n, n if held_out else 0, seed, n_held_out=n_held_out)
    return synthetic.write_jsonl(held if held_out else train, path)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize(name: str, build: Callable[[Path], None]) -> Path:
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


def cache_key(*parts: Any) -> str:
    return hashlib.sha1(repr((GENERATOR_VERSION, *parts)).encode()).hexdigest()[:10]


def resolve_dataset(spec: str, field: str = "data.train.path") -> str:
    """`synthetic:arith[?n=..&seed=..&max_difficulty=..]` or `synthetic:steps[?n=..&seed=..&held_out=0|1&
    n_held_out=..]` -> a cached .jsonl; others unchanged."""
    if not spec.startswith("synthetic:"):
        return spec
    task, _, query = spec.removeprefix("synthetic:").partition("?")
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"{field}: {spec!r}: unknown synthetic task (one of {list(SYNTHETIC_TASKS)})")
    params = dict(_DEFAULTS[task])
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in params:
            raise ValueError(f"{field}: {spec!r}: unknown parameter {key!r} (accepted: {sorted(params)})")
        try:
            params[key] = int(value)
        except ValueError:
            raise ValueError(f"{field}: {spec!r}: {key} must be an integer, got {value!r}") from None
    if task == "steps":
        if (
            params["n"] < 1
            or params["held_out"] not in (0, 1)
            or (params["held_out"] and params["n"] > params["n_held_out"])
        ):
            raise ValueError(f"{field}: {spec!r}: needs n >= 1, held_out 0 or 1, and n <= n_held_out when held_out=1")
        name = (
            f"{task}-n{params['n']}-s{params['seed']}-h{params['held_out']}-{cache_key(task, sorted(params.items()))}"
        )
        entry = materialize(name, lambda d: write_steps(d / "data.jsonl", **params))
        return str(entry / "data.jsonl")
    if params["n"] < 1 or not 0 <= params["max_difficulty"] <= 2:
        raise ValueError(f"{field}: {spec!r}: needs n >= 1 and max_difficulty in [0, 2]")
    name = (
        f"{task}-n{params['n']}-s{params['seed']}-d{params['max_difficulty']}-{cache_key(task, sorted(params.items()))}"
    )
    entry = materialize(name, lambda d: write_arith(d / "data.jsonl", **params))
    return str(entry / "data.jsonl")
