"""1-rank worker: the converters' and loaders' failure modes, through the CLIs' main() in-process.

argv: OUT_DIR HF_DIR. Every scenario records the exit code and stderr of each CLI run (or the
error of a Python call) into OUT_DIR/results.json; tests/conversion/test_reliability.py asserts
on them. Scenarios:
  - a sharded export, then a re-export into the same folder: without and with --overwrite
  - hf_to_megatron into a trained checkpoint (with optimizer state): without and with --overwrite
  - a flipped bit in a data file: megatron_to_hf and load_checkpoint, with and without verification
  - a truncated data file, with and without verification
  - a checkpoint saved before checksums existed (sidecar without them)
  - an output path under a regular file, and a write that fails (RLIMIT_FSIZE)
OUT_DIR/mcore (converted) and OUT_DIR/export_sharded (a 20 KB-shard export) stay for the kill -9 tests.
"""

import contextlib
import io
import json
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from agpo_megatron.bridge.hf_io import HFCheckpointReader
from agpo_megatron.checkpoint.metadata import SIDECAR, read_meta, stored_tensors
from agpo_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from agpo_megatron.config.model import ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.cpu_platform import megatron_scope
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from checkpoints_conversion import hf_to_megatron, megatron_to_hf
from tests.workers.conversion_layouts import build_at, tokens


def run(module, *args) -> dict:
    """A CLI's main(), in this process: its exit code and what it printed to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = module.main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, err = "raised", io.StringIO(traceback.format_exc())
    return {"rc": rc, "err": err.getvalue()}


def attempt(fn) -> str:
    """'' if fn() returns, else 'ExceptionType: message'."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            fn()
    except BaseException as e:  # torch's CheckpointException is a BaseException
        return f"{type(e).__name__}: {e}"
    return "" if not err.getvalue() else f"(stderr) {err.getvalue()}"


def listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def fresh_model(arch):
    return build_at(arch, 1, 1)[1]


def trained_checkpoint(arch, hf: Path, converted: Path, out: Path) -> None:
    """A trainer checkpoint with optimizer and scheduler state, after one step."""
    _, model = build_at(arch, 1, 1)
    load_checkpoint(converted, [model])
    optim = OptimConfig(lr=1e-2, warmup_steps=2, decay_style="cosine")
    ddp, opt, sched = build.wrap_for_training(
        model, optim, ParallelConfig(use_distributed_optimizer=True), total_steps=10
    )
    toks = tokens(arch.vocab_size)[:2]
    mbs = [{"tokens": toks, "targets": torch.roll(toks, -1, dims=1)}]

    def loss_fn(logits, mb):
        lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
        return -lp.mean(), {}

    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
    with megatron_scope():
        opt.step()
    sched.step(1)
    save_checkpoint(out, [ddp], opt, sched, step=3, hf_dir=hf)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with EFBIG (as on a full disk), for this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def main() -> None:
    out, hf = Path(sys.argv[1]), Path(sys.argv[2])
    arch = read_arch(hf)
    m2h, h2m = megatron_to_hf, hf_to_megatron
    r: dict = {}
    mcore = out / "mcore"
    r["h2m"] = run(h2m, "--hf-dir", hf, "--out", mcore)
    r["mcore_files"] = sorted(listing(mcore))
    r["mcore_checksums"] = sorted(getattr(read_meta(mcore), "checksums", {}))

    # -- stale shards: a sharded export, then a single-file bf16 export into the same folder
    export = out / "export"
    r["m2h_sharded"] = run(m2h, "--ckpt", mcore, "--out", export, "--max-shard-bytes", 20_000)
    shutil.copytree(export, out / "export_sharded")
    before = listing(export)
    r["reexport"] = run(m2h, "--ckpt", mcore, "--out", export, "--dtype", "bfloat16")
    r["reexport_left_untouched"] = listing(export) == before
    r["reexport_overwrite"] = run(m2h, "--ckpt", mcore, "--out", export, "--dtype", "bfloat16", "--overwrite")
    r["overwritten_files"] = sorted(listing(export))
    reader = HFCheckpointReader(export)
    r["overwritten_reader_dtype"] = str(reader.dtype_of("model.embed_tokens.weight"))
    r["parent_leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))

    # -- hf_to_megatron into a trained checkpoint
    trained = out / "trained"
    trained_checkpoint(arch, hf, mcore, trained)
    r["trained_optimizer_keys"] = sum(k.startswith("optimizer.") for k in stored_tensors(trained))
    before = listing(trained)
    r["into_trained"] = run(h2m, "--hf-dir", hf, "--out", trained)
    r["trained_left_untouched"] = listing(trained) == before
    r["into_trained_overwrite"] = run(h2m, "--hf-dir", hf, "--out", trained, "--overwrite")
    r["overwritten_optimizer_keys"] = sum(k.startswith("optimizer.") for k in stored_tensors(trained))
    meta = read_meta(trained)
    r["overwritten_meta"] = [meta.source.split(":")[0], meta.step]

    # -- a flipped bit inside a tensor's bytes (the middle of the largest stored record)
    flipped = Path(shutil.copytree(mcore, out / "flipped"))
    md = FileSystemReader(str(flipped)).read_metadata()
    info = max(md.storage_data.values(), key=lambda i: i.length)
    data = bytearray((flipped / info.relative_path).read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    (flipped / info.relative_path).write_bytes(bytes(data))
    r["flipped_file"] = info.relative_path
    r["flip"] = run(m2h, "--ckpt", flipped, "--out", out / "flip_export")
    r["flip_export_exists"] = (out / "flip_export").exists()
    r["flip_noverify"] = run(m2h, "--ckpt", flipped, "--out", out / "flip_export", "--no-verify")
    src, got = HFCheckpointReader(hf), HFCheckpointReader(out / "flip_export")
    r["flip_noverify_changed"] = [k for k in src.keys() if not torch.equal(src.get(k), got.get(k))]
    init_model_parallel(1, 1, seed=1)
    r["flip_load"] = attempt(lambda: load_checkpoint(flipped, [fresh_model(arch)]))
    r["flip_load_noverify"] = attempt(lambda: load_checkpoint(flipped, [fresh_model(arch)], verify=False))

    # -- a truncated data file
    trunc = Path(shutil.copytree(mcore, out / "trunc"))
    f = trunc / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r["trunc"] = run(m2h, "--ckpt", trunc, "--out", out / "trunc_export")
    r["trunc_noverify"] = run(m2h, "--ckpt", trunc, "--out", out / "trunc_export", "--no-verify")
    init_model_parallel(1, 1, seed=1)
    r["trunc_load_noverify"] = attempt(lambda: load_checkpoint(trunc, [fresh_model(arch)], verify=False))

    # -- a checkpoint from before checksums: its sidecar lacks them
    old = Path(shutil.copytree(mcore, out / "old"))
    sidecar = json.loads((old / SIDECAR).read_text())
    sidecar.pop("checksums", None)
    (old / SIDECAR).write_text(json.dumps(sidecar))
    r["old"] = run(m2h, "--ckpt", old, "--out", out / "old_export")
    init_model_parallel(1, 1, seed=1)
    r["old_load"] = attempt(lambda: load_checkpoint(old, [fresh_model(arch)]))

    # -- unusable outputs: a path under a regular file; a write that fails part-way
    (out / "afile").write_text("not a folder")
    r["under_file_m2h"] = run(m2h, "--ckpt", mcore, "--out", out / "afile" / "hf")
    r["under_file_h2m"] = run(h2m, "--hf-dir", hf, "--out", out / "afile" / "mcore")
    with file_size_limit(100_000):  # the distcp file of this model is about 400 KB
        r["efbig_h2m"] = run(h2m, "--hf-dir", hf, "--out", out / "big")
        init_model_parallel(1, 1, seed=1)
        model = fresh_model(arch)
        r["efbig_save"] = attempt(lambda: save_checkpoint(out / "big_save", [model]))
    r["efbig_out_exists"] = (out / "big").exists()
    r["final_leftovers"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))

    (out / "results.json").write_text(json.dumps(r, indent=1))
    exit_cleanly(0)


if __name__ == "__main__":
    main()
