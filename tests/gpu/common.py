"""What every smoke check shares: the run mode, the one-line result, API checks, tiny shapes, metrics.

Modes (`Ctx.mode`):
- "gpu": the real run on one CUDA device (NCCL, bf16, full fused-loss size);
- "cpu-logic": the same check code at tiny sizes on CPU/gloo. It proves the checks call the
  project's APIs correctly; it says nothing about GPU behaviour;
- "dry-run": only each section's `prepare` runs: imports, API presence, argument and size checks.

A check reports exactly one line, `SMOKE <check> <STATUS> key=value ...`, and appends the same
record as one JSON line to the section's results file, so that the runner (tests/gpu/smoke.py)
still has every finished check when a later one crashes the process.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("gpu", "cpu-logic", "dry-run")
STATUSES = ("PASS", "FAIL", "SKIP", "READY")  # READY: dry-run only (imports and arguments OK)


class ApiMissing(RuntimeError):
    """The project lacks a function/attribute/parameter a check calls (e.g. a rename)."""


class Skip(Exception):
    """Raised by a check that cannot run here (no FP8 on this GPU, a mode without the feature)."""


@dataclass
class Ctx:
    """One worker's view of the run: mode, options from the runner, where results go."""

    mode: str
    """One of MODES."""
    opts: dict[str, Any] = field(default_factory=dict)
    """Sizes and tolerances from the runner's command line (--fused-n ... as fused_n)."""
    results_path: Path | None = None
    """JSON-lines file each report is appended to (None: print only)."""
    work_dir: Path | None = None
    """Scratch directory (created on first use by workdir())."""
    section: str = ""
    """The section being run, recorded with each result."""

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def dtype_name(self) -> str:
        # bf16 is what the GPU path runs; on CPU too, so the cpu-logic run takes the same
        # Float16Module / fp32-main-param branches of Megatron (tiny sizes keep it cheap).
        return "bfloat16"

    def opt(self, key: str, default: Any) -> Any:
        return self.opts.get(key, default)

    def workdir(self) -> Path:
        """A scratch directory for this section (checkpoints, tiny HF models)."""
        import tempfile

        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix=f"agpo_smoke_{self.section}_"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def report(self, check: str, status: str, **fields: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        fields = {k: _jsonable(v) for k, v in fields.items()}
        if self.mode != "gpu":
            fields = {"mode": self.mode, **fields}
        print(format_line(check, status, fields), flush=True)
        if self.results_path is not None:
            rec = {"check": check, "status": status, "section": self.section, "fields": fields}
            with open(self.results_path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def format_line(check: str, status: str, fields: dict[str, Any]) -> str:
    return f"SMOKE {check} {status} " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v).replace("\n", " | ")
    return repr(s) if (" " in s or not s) else s


def short(e: BaseException, n: int = 300) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " | ")[:n]


@contextlib.contextmanager
def check(ctx: Ctx, name: str, **on_fail: Any) -> Iterator[dict[str, Any]]:
    """Run one check's body; an exception becomes its FAIL line (Skip becomes SKIP).

    The body reports its own PASS/FAIL line; if it reports nothing, that is a FAIL too.
    """
    state: dict[str, Any] = {}
    try:
        yield state
    except Skip as e:
        ctx.report(name, "SKIP", reason=str(e))
    except Exception as e:  # noqa: BLE001  (a smoke check turns any error into its FAIL line)
        traceback.print_exc()
        ctx.report(name, "FAIL", error=short(e), **on_fail)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def judge(**conditions: bool) -> tuple[str, dict[str, str]]:
    """PASS when every named condition holds; else FAIL plus a `failed=` field naming the ones that did not."""
    failed = [name for name, ok in conditions.items() if not ok]
    return ("FAIL", {"failed": ",".join(failed)}) if failed else ("PASS", {})


# ---- API presence (what the dry-run checks so that a rename fails on CPU) -----------------------


def require_attrs(obj: Any, *names: str, why: str = "") -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        label = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        raise ApiMissing(f"{label} lacks {', '.join(missing)}" + (f" ({why})" if why else ""))


def require_params(fn: Any, *params: str, why: str = "") -> None:
    have = inspect.signature(fn).parameters
    missing = [p for p in params if p not in have]
    if missing:
        raise ApiMissing(f"{fn.__qualname__}() takes no parameter {', '.join(missing)}" + (f" ({why})" if why else ""))


# ---- tiny shapes and configs -------------------------------------------------------------------


def tiny_arch(dtype: str = "bfloat16", vocab: int = 1024):
    """A 2-layer Qwen2-like model: GQA, qkv bias, head dim 64 (what flash attention and vLLM accept)."""
    from agpo_megatron.models.hf_config import ModelArch

    return ModelArch(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=256,
        ffn_hidden_size=512,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=512,
        qkv_bias=True,
        qk_layernorm=False,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )


def tiny_cfg(ctx: Ctx, *, spec: str = "local", fp8: str | None = None, fused_loss: bool = True):
    """The slice of TrainConfig that `policy.Actor` and `models.build` read, from the real dataclasses
    (so a renamed or newly required field fails here, in the dry-run)."""
    from types import SimpleNamespace

    from agpo_megatron.config.algo import AlgoConfig
    from agpo_megatron.config.model import ModelConfig, ParallelConfig
    from agpo_megatron.config.schema import OptimConfig

    return SimpleNamespace(
        model=ModelConfig(init_from="random", spec=spec, params_dtype=ctx.dtype_name, fp8=fp8, max_seq_len=256),
        parallel=ParallelConfig(tp=1, pp=1, use_distributed_optimizer=True, seed=1234),
        # lr 1e-2: Adam's first step moves each weight by ~lr, which bf16 resolves even at 1.0 (norms).
        optim=OptimConfig(lr=1e-2, clip_grad=1.0),
        algo=AlgoConfig(fused_loss=fused_loss, loss_chunk_tokens=32),
    )


def tiny_sequences(vocab: int, seed: int = 0):
    """Four prompt+response rows of ragged length, as the trainer builds them (batch.Sequences)."""
    import torch

    from agpo_megatron.train import batch as batching

    g = torch.Generator().manual_seed(seed)
    toks = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (37, 52, 61, 29)]
    return batching.Sequences(
        tokens=toks, prompt_lens=[9, 11, 7, 5], advantages=torch.tensor([1.0, -0.5, 0.3, -1.0]), rollout_logprobs=None
    )


def micro_batches(seqs):
    """Two micro-batches of two rows, padded as the trainer pads them."""
    from agpo_megatron.train import batch as batching

    return batching.split_micro_batches(seqs, micro_batch_size=2, max_tokens=None, pad_id=0, uniform_length=False)


def policy_step(actor, mbs, seqs):
    """One `Actor.policy_step` with the default loss, no KL and eps 0.2, normalised by the batch's own
    counts: the plain update the smoke checks time, measure or watch."""
    from agpo_megatron.algo.loss import PolicyLossConfig

    return actor.policy_step(
        mbs,
        PolicyLossConfig(),
        temperature=1.0,
        global_num_tokens=seqs.num_response_tokens(),
        global_num_seqs=len(seqs),
        kl_coef=0.0,
        eps=(0.2, 0.2),
    )


# ---- numbers -------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64 (b is the reference)."""
    a, b = a.detach().double(), b.detach().double().to(a.device)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def sync(ctx: Ctx) -> None:
    if ctx.gpu:
        import torch

        torch.cuda.synchronize()


def gib(nbytes: float) -> float:
    return nbytes / 2**30


class Timer:
    """Milliseconds of the enclosed block: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, ctx: Ctx):
        self.gpu, self.ms = ctx.gpu, float("nan")

    def __enter__(self) -> Timer:
        if self.gpu:
            import torch

            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.gpu:
            import torch

            self.b.record()
            torch.cuda.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


def flush_exit(code: int = 0) -> None:
    """Leave without interpreter teardown (NCCL/gloo/vLLM destructors can hang or abort at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
