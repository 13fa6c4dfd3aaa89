"""The one-GPU smoke suite of issue 8: runner, worker and check table.

    python -m tests.gpu.smoke                 # on one H100/H200 (or: bash scripts/gpu_smoke.sh)
    python -m tests.gpu.smoke --dry-run       # CPU: imports, API presence, arguments; nothing runs
    python -m tests.gpu.smoke --cpu-logic     # CPU/gloo, tiny sizes: the check code itself
    python -m tests.gpu.smoke --list

Each section (one or more checks that share a set-up) runs in its own subprocess with its own
timeout, so a CUDA crash or a hang in one does not hide the others; a check its section did not
report is a FAIL that says why (exit code, timeout). The dry-run runs every section's `prepare`
in one CPU-only process. Output: one `SMOKE <check> <STATUS> key=value ...` line per check, then
`N passed, N failed, N skipped`; the exit code is 1 if any check failed. `--out DIR` keeps
results.json, summary.txt and one log per section; `--json FILE` writes results.json elsewhere.

megatron-core may be a source copy: if `import megatron.core` fails, `$MCORE_SRC` and then
`<repo>/.mcore` (a directory holding `megatron/`) go on the workers' PYTHONPATH.
Optional packages: a section whose `needs` are not installed is SKIPped (vLLM, Transformer Engine).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A world of one per worker: never inherit a launcher's rendezvous.
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "TORCHELASTIC_RUN_ID",
)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    """The name --only/--skip accept, and the worker's log name."""
    module: str
    """Module under tests/gpu holding the section (and its `prepare`, which the dry-run calls)."""
    fn: str
    """The function of `module` that runs the section: fn(ctx)."""
    checks: tuple[str, ...]
    """The SMOKE lines it reports, in order."""
    timeout_s: int
    """Wall-clock limit of its subprocess on a GPU (imports and compilation included)."""
    needs: tuple[str, ...] = ()
    """Optional top-level packages; absent ones make the section SKIP (GPU mode)."""
    cpu_logic: bool = True
    """Whether the cpu-logic mode runs it (False: CUDA-only, SKIP there)."""
    cpu_needs: tuple[str, ...] | None = None
    """`needs` in the cpu-logic mode (None: the same as `needs`)."""


_VLLM_NEEDS = ("vllm", "transformers", "tokenizers", "safetensors")
SECTIONS: tuple[Section, ...] = (
    Section("env", "checks_env", "run_env", ("env",), 60),
    Section("nccl_world", "checks_dist", "run_nccl_world", ("nccl_world",), 90),
    Section("megatron_groups", "checks_dist", "run_megatron_groups", ("megatron_groups",), 90),
    Section(
        "d1_reduce_token_weighted", "checks_dist", "run_d1_reduce_token_weighted", ("d1_reduce_token_weighted",), 90
    ),
    Section("policy_step", "checks_dist", "run_policy_step", ("policy_step",), 150),
    Section("local_fwd_bwd_bf16", "checks_megatron", "run_local_fwd_bwd", ("local_fwd_bwd_bf16",), 120),
    Section("local_sdpa_parity", "checks_megatron", "run_local_sdpa_parity", ("local_sdpa_parity",), 120),
    Section("ddp_distopt_step", "checks_megatron", "run_ddp_step", ("ddp_distopt_step",), 150),
    Section("bridge_export", "checks_megatron", "run_bridge_export", ("bridge_export",), 120),
    Section(
        "fused_loss",
        "checks_fused",
        "run_fused_loss",
        ("fused_loss_parity", "fused_loss_time", "fused_loss_memory"),
        240,
    ),
    Section(
        "te_spec_fwd_bwd",
        "checks_te",
        "run_te_spec",
        ("te_spec_fwd_bwd",),
        150,
        ("transformer_engine",),
        cpu_logic=False,
    ),
    Section(
        "te_fp8_fwd_bwd", "checks_te", "run_te_fp8", ("te_fp8_fwd_bwd",), 150, ("transformer_engine",), cpu_logic=False
    ),
    Section(
        "te_checkpoint_roundtrip",
        "checks_te",
        "run_te_checkpoint_roundtrip",
        ("te_checkpoint_roundtrip",),
        180,
        ("transformer_engine",),
        cpu_needs=(),
    ),
    Section(
        "te_packed_thd",
        "checks_te",
        "run_te_packed_thd",
        ("te_packed_thd",),
        150,
        ("transformer_engine",),
        cpu_needs=(),
    ),
    Section(
        "te_rope_fusion_thd",
        "checks_te",
        "run_te_rope_fusion_thd",
        ("te_rope_fusion_thd",),
        120,
        ("transformer_engine",),
        cpu_logic=False,
    ),
    # issue 18 (the GPU path, round 2)
    Section("save_peak_memory", "checks_round2", "run_save_peak_memory", ("save_peak_memory",), 180),
    Section("pinned_bytes", "checks_round2", "run_pinned_bytes", ("pinned_bytes",), 90),
    Section("finite_check_syncs", "checks_round2", "run_finite_check_syncs", ("finite_check_syncs",), 90),
    Section(
        "local_device_binding",
        "checks_round2",
        "run_local_device_binding",
        ("local_device_binding",),
        60,
        cpu_logic=False,
    ),
    # issue 23 (mixture-of-experts): a tiny Qwen3-MoE on the TE spec at EP=1, and its vLLM sync
    Section(
        "moe_te_fwd_bwd",
        "checks_moe",
        "run_moe_te_fwd_bwd",
        ("moe_te_fwd_bwd",),
        180,
        ("transformer_engine",),
        cpu_needs=(),
    ),
    Section(
        "moe_vllm_sync",
        "checks_moe",
        "run_moe_vllm_sync",
        ("moe_vllm_sync",),
        300,
        (*_VLLM_NEEDS, "transformer_engine"),
        cpu_logic=False,
    ),
    Section(
        "moe_r3_replay",
        "checks_moe",
        "run_moe_r3_replay",
        ("moe_r3_replay",),
        300,
        (*_VLLM_NEEDS, "triton"),
        cpu_needs=(),
    ),
    # issue 21 (asynchronous RL)
    Section("disaggregated_link", "checks_async", "run_disaggregated_link", ("disaggregated_link",), 300),
    Section(
        "vllm",
        "checks_vllm",
        "run_vllm",
        ("vllm_sleep_wake_memory", "vllm_weight_sync", "vllm_logprob_agreement"),
        360,
        _VLLM_NEEDS,
    ),
)
ALL_CHECKS = tuple(c for s in SECTIONS for c in s.checks)


@dataclasses.dataclass
class Result:
    check: str
    status: str
    section: str
    fields: dict

    def line(self) -> str:
        from tests.gpu.common import format_line

        return format_line(self.check, self.status, self.fields)


# ---- runner ------------------------------------------------------------------------------------


def _importable(mod: str, extra_path: list[str]) -> bool:
    saved = list(sys.path)
    sys.path[:0] = extra_path
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False
    finally:
        sys.path[:] = saved


def find_mcore() -> list[str]:
    """Extra PYTHONPATH entries for a megatron-core source copy ([] when it is installed)."""
    if _importable("megatron.core", []):
        return []
    for cand in (os.environ.get("MCORE_SRC", ""), str(REPO / ".mcore")):
        if cand and (Path(cand) / "megatron" / "core").is_dir():
            return [cand]
    return []


def select(only: list[str], skip: list[str]) -> list[Section]:
    known = {s.name for s in SECTIONS} | set(ALL_CHECKS)
    bad = [n for n in only + skip if n not in known]
    if bad:
        raise ValueError(f"unknown section/check {', '.join(bad)}; --list shows them")
    chosen = [s for s in SECTIONS if not only or s.name in only or set(s.checks) & set(only)]
    return [s for s in chosen if s.name not in skip and not set(s.checks) & set(skip)]


def _worker_env(mode: str, extra_path: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *extra_path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    if mode != "gpu":  # nothing may touch a GPU in the CPU modes, even on a GPU machine
        env["CUDA_VISIBLE_DEVICES"] = ""
    if mode == "cpu-logic":
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _spawn(
    worker: str, mode: str, opts: dict, out: Path, extra_path: list[str], timeout: float
) -> tuple[list[Result], str]:
    """Run one worker; returns what it reported and a reason string if it did not exit cleanly."""
    res_file, log = out / "results" / f"{worker}.jsonl", out / "logs" / f"{worker}.log"
    res_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tests.gpu.smoke",
        "--worker",
        worker,
        "--mode",
        mode,
        "--results",
        str(res_file),
        "--opts",
        json.dumps(opts),
    ]
    why = ""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, env=_worker_env(mode, extra_path), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
            if rc != 0:
                why = f"worker exited {rc}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:.0f}s"
    got = []
    if res_file.exists():
        for row in res_file.read_text().splitlines():
            got.append(Result(**json.loads(row)))
    if why:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
        why += f" ({log.name}: {tail[0][-160:]})"
    return got, why


def run(
    sections: list[Section], mode: str, opts: dict, out: Path, budget_s: float | None = None, stream=sys.stdout
) -> list[Result]:
    """Run the sections in `mode`; print each check's line as its section ends; return the results."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    extra = find_mcore()
    print(
        f"smoke: mode={mode} repo={REPO} python={sys.executable} megatron_core="
        f"{extra[0] if extra else 'installed' if _importable('megatron.core', []) else 'MISSING'} out={out}",
        file=sys.stderr,
        flush=True,
    )
    results: list[Result] = []

    def emit(r: Result) -> None:
        results.append(r)
        print(r.line(), file=stream, flush=True)

    if mode == "dry-run":
        got, why = _spawn("ALL", mode, {**opts, "sections": [s.name for s in sections]}, out, extra, 600)
        by_check = {r.check: r for r in got}
        for s in sections:
            for c in s.checks:
                emit(by_check.get(c) or Result(c, "FAIL", s.name, {"mode": mode, "reason": f"not reported: {why}"}))
        return results

    gpu_missing = mode == "gpu" and not _cuda_available()
    budget_s = budget_s or (450.0 if mode == "gpu" else 1800.0)
    start = time.monotonic()
    for s in sections:
        needs = s.needs if mode == "gpu" or s.cpu_needs is None else s.cpu_needs
        missing = [m for m in needs if not _importable(m, extra)]
        reason = ""
        if mode == "cpu-logic" and not s.cpu_logic:
            reason = "CUDA-only (cpu-logic mode)"
        elif gpu_missing and s.name != "env":
            reason = "no CUDA device (use --dry-run or --cpu-logic on CPU)"
        elif missing:
            reason = f"{','.join(missing)} not installed"
        elif budget_s - (time.monotonic() - start) < 20:
            reason = f"suite budget of {budget_s:.0f}s spent (--budget-s)"
        if reason:
            for c in s.checks:
                fields = {"reason": reason} if mode == "gpu" else {"mode": mode, "reason": reason}
                emit(Result(c, "SKIP", s.name, fields))
            continue
        print(
            f"smoke: section {s.name} (timeout {s.timeout_s}s, {time.monotonic() - start:.0f}s elapsed)",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        # A section may not run past the suite's budget; CPU runs get twice its GPU timeout.
        limit = min(s.timeout_s * (2 if mode == "cpu-logic" else 1), budget_s - (time.monotonic() - start))
        got, why = _spawn(s.name, mode, opts, out, extra, limit)
        by_check = {r.check: r for r in got}
        for c in s.checks:
            r = by_check.get(c) or Result(c, "FAIL", s.name, {"reason": f"not reported: {why or 'no line'}"})
            r.fields.setdefault("section_s", round(time.monotonic() - t0, 1))
            emit(r)
    return results


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def counts(results: list[Result]) -> dict[str, int]:
    return {k: sum(r.status == k.upper() for r in results) for k in ("pass", "fail", "skip", "ready")}


def summary_line(results: list[Result], mode: str) -> str:
    n = counts(results)
    line = f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"
    if mode == "dry-run":
        line += f", {n['ready']} ready (dry run: imports and arguments only, nothing ran)"
    return line


def write_outputs(
    results: list[Result], mode: str, out: Path, json_path: Path | None, wall_s: float, opts: dict
) -> None:
    doc = {
        "mode": mode,
        "wall_s": round(wall_s, 1),
        "argv": sys.argv[1:],
        "opts": opts,
        "counts": counts(results),
        "results": [dataclasses.asdict(r) for r in results],
    }
    text = json.dumps(doc, indent=1) + "\n"
    (out / "results.json").write_text(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    (out / "summary.txt").write_text("".join(r.line() + "\n" for r in results) + summary_line(results, mode) + "\n")


# ---- worker ------------------------------------------------------------------------------------


def worker_main(name: str, mode: str, results: Path, opts: dict) -> None:
    from tests.gpu.common import Ctx, flush_exit, short

    sections = {s.name: s for s in SECTIONS}
    if name == "ALL":  # the dry-run: every selected section's prepare, in this one process
        for sname in opts.get("sections", list(sections)):
            s = sections[sname]
            ctx = Ctx(mode=mode, opts=opts, results_path=results, section=s.name)
            try:
                facts = importlib.import_module(f"tests.gpu.{s.module}").prepare(ctx) or {}
                missing = [m for m in s.needs if importlib.util.find_spec(m) is None]
                for c in s.checks:
                    if missing:
                        why = f"{','.join(missing)} not installed here (project-side API checked)"
                        ctx.report(c, "SKIP", reason=why)
                    else:
                        ctx.report(c, "READY", cuda_only=not s.cpu_logic, timeout_s=s.timeout_s, **facts)
            except Exception as e:  # noqa: BLE001  (each failure is its checks' FAIL line)
                for c in s.checks:
                    ctx.report(c, "FAIL", error=short(e))
        flush_exit(0)
    s = sections[name]
    ctx = Ctx(mode=mode, opts=opts, results_path=results, section=s.name)
    reported: set[str] = set()
    try:
        getattr(importlib.import_module(f"tests.gpu.{s.module}"), s.fn)(ctx)
    except Exception as e:  # noqa: BLE001  (e.g. prepare() found a missing API before any check began)
        import traceback

        traceback.print_exc()
        if results.exists():
            reported = {json.loads(row)["check"] for row in results.read_text().splitlines()}
        for c in s.checks:
            if c not in reported:
                ctx.report(c, "FAIL", error=short(e))
    flush_exit(0)


# ---- CLI ---------------------------------------------------------------------------------------


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU: imports, API presence and arguments only")
    mode.add_argument("--cpu-logic", action="store_true", help="CPU/gloo at tiny sizes: the checks' own logic")
    p.add_argument("--list", action="store_true", help="print the sections and their checks, run nothing")
    p.add_argument("--only", type=_csv, default=[], help="comma-separated sections or checks")
    p.add_argument("--skip", type=_csv, default=[], help="comma-separated sections or checks")
    p.add_argument("--out", type=Path, default=None, help="results.json, summary.txt, logs/ (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write results.json here")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the suite: no section runs past it (default 450 on GPU, 1800 on CPU)",
    )
    g = p.add_argument_group("sizes and tolerances")
    g.add_argument("--fused-n", type=int, help="fused loss: tokens (GPU default 4096)")
    g.add_argument("--fused-h", type=int, help="fused loss: hidden size (GPU default 3584)")
    g.add_argument("--fused-v", type=int, help="fused loss: vocabulary (GPU default 152064)")
    g.add_argument("--fused-chunk", type=int, help="fused loss: chunk_tokens (GPU default 1024)")
    g.add_argument("--fused-reps", type=int, help="fused loss: timed repetitions (default 3)")
    g.add_argument("--save-kv-mib", type=int, help="save_peak_memory: the stand-in engine's MiB (default 2048)")
    g.add_argument("--vllm-gpu-util", type=float, help="vLLM gpu_memory_utilization (default 0.3)")
    g.add_argument("--vllm-sleep-level", type=int, choices=(1, 2), help="rollout.sleep_level (default 2)")
    g.add_argument("--vllm-eager", action="store_true", default=None, help="vLLM without CUDA graphs")
    g.add_argument("--vllm-lp-max", type=float, help="engine vs Megatron log-probs: max |diff| (default 0.25)")
    g.add_argument("--vllm-lp-mean", type=float, help="engine vs Megatron log-probs: mean |diff| (default 0.05)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for k in ("fused_n", "fused_h", "fused_v", "fused_chunk", "fused_reps"):
        v = getattr(args, k)
        if v is not None and v < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.vllm_gpu_util is not None and not 0 < args.vllm_gpu_util < 1:
        p.error(f"--vllm-gpu-util must be in (0, 1), got {args.vllm_gpu_util}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.mode, args.results, json.loads(args.opts))
    if args.list:
        for s in SECTIONS:
            print(
                f"{s.name:26s} {','.join(s.checks):60s} timeout={s.timeout_s}s"
                + (f" needs={','.join(s.needs)}" if s.needs else "")
                + ("" if s.cpu_logic else " cuda-only")
            )
        return 0
    mode = "dry-run" if args.dry_run else "cpu-logic" if args.cpu_logic else "gpu"
    keys = (
        "fused_n",
        "fused_h",
        "fused_v",
        "fused_chunk",
        "fused_reps",
        "vllm_gpu_util",
        "vllm_sleep_level",
        "vllm_eager",
        "vllm_lp_max",
        "vllm_lp_mean",
        "save_kv_mib",
    )
    opts = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        sections = select(args.only, args.skip)
    except ValueError as e:
        print(f"gpu_smoke: error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("SMOKE_OUT") or tempfile.mkdtemp(prefix="agpo_gpu_smoke_"))
    t0 = time.monotonic()
    results = run(sections, mode, opts, out, args.budget_s)
    write_outputs(results, mode, out, args.json, time.monotonic() - t0, opts)
    print(summary_line(results, mode), flush=True)
    print(f"smoke: results in {out}/results.json, logs in {out}/logs", file=sys.stderr)
    return 1 if counts(results)["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
