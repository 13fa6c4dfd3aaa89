"""Per-file checksums of a checkpoint folder: taken while the files are written, checked before a
load reads any tensor.

An entry is `{"bytes": <size>, "<algo>": "<hex digest>"}`, keyed by the file's path relative to
the folder. The algorithm is blake3 when it is importable (a vLLM dependency), else sha256.
Each entry names its own algorithm, so a checkpoint verifies wherever that algorithm exists.
blake3 hashes several times faster than hashlib's sha256; docs/benchmarks.md ("Checksums") has
the measured speeds and what they cost a conversion.

Checksums catch accidental corruption (a flipped bit on disk or in transit, a truncated copy),
not tampering: whoever can edit a data file can edit the sidecar too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the environment
    _blake3 = None

ALGO = "blake3" if _blake3 is not None else "sha256"
_CHUNK = 8 * 2**20


def new_hasher(algo: str = ALGO):
    if algo == "blake3":
        if _blake3 is None:
            raise ValueError("blake3 is not installed (pip install blake3)")
        return _blake3.blake3()
    return hashlib.new(algo)


class HashingWriter:
    """A write-only binary stream over an open file that hashes and counts what passes through.

    `torch.save` reports a failed write of its stream only as "unexpected pos A vs B"; the
    first `OSError` is kept in `error` so that the caller can name the real cause.
    """

    def __init__(self, f, algo: str = ALGO):
        self.f, self.algo, self.nbytes = f, algo, 0
        self.hasher = new_hasher(algo)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            self.f.write(view)
        except OSError as e:
            self.error = self.error or e
            raise
        self.hasher.update(view)
        self.nbytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self.f.flush()

    def entry(self) -> dict[str, Any]:
        return {"bytes": self.nbytes, self.algo: self.hasher.hexdigest()}


def file_entry(path: Path, algo: str = ALGO) -> dict[str, Any]:
    """The entry of a file already written (one read pass)."""
    h = new_hasher(algo)
    n = 0
    buf = bytearray(_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            h.update(memoryview(buf)[:k])
            n += k
    return {"bytes": n, algo: h.hexdigest()}


def complete(root: Path, entries: dict[str, dict[str, Any]], skip: set[str]) -> dict[str, dict[str, Any]]:
    """`entries` plus an entry for every other file under `root` (hashed now), except `skip`."""
    out = dict(entries)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel not in out and rel not in skip:
            out[rel] = file_entry(f)
    return dict(sorted(out.items()))


SKIP_CONVERTER = "--no-verify"
"""How a converter (and `load_checkpoint(verify=False)`) skips the check; `agpo train`'s is
`checkpoint.verify=false`."""


def check(root: Path, rel: str, entry: dict[str, Any], sidecar: str, skip_hint: str = SKIP_CONVERTER) -> str | None:
    """None if `root/rel` matches `entry`, else a one-line reason naming the file and how to skip
    the check (`skip_hint`: the flag or config field of the program that loads it)."""
    path = root / rel
    if not path.is_file():
        return f"{path}: missing ({sidecar} lists it)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        cut = "truncated" if size < entry["bytes"] else "longer than saved"
        return f"{path}: {cut}: {size} bytes, {sidecar} records {entry['bytes']}"
    algo = next(k for k in entry if k != "bytes")
    try:
        got = file_entry(path, algo)[algo]
    except ValueError as e:
        return f"{path}: cannot verify its {algo} checksum: {e}; or skip verification ({skip_hint})"
    if got != entry[algo]:
        return (
            f"{path}: checksum mismatch ({algo}): the file is corrupt or changed since it was saved; "
            f"{skip_hint} loads it anyway"
        )
    return None
