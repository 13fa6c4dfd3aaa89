"""`agpo eval`: the paper's Table 1 for any checkpoint, on vLLM with the training grader.

    agpo eval --model <HF dir | Megatron checkpoint step folder> [--model ...] --data <jsonl|parquet>
              [--n 4] [--temperature 0.6] [--top-p 0.95] [--max-new-tokens 3000] [--tp 1]
              [--out runs/eval] [--prompt-field problem] [--answer-field answer] [--level-field level]

Per model: pass@1 (the mean over n samples), pass@n, mean tokens (all, correct, wrong) and the
truncation rate, overall and per level when the data has a level field (MATH500 has `level`).
Several models give one side-by-side table, with the % change of tokens (and the pass@1 change in
points) against the first model: OUT/eval.md and OUT/eval.json. Every input is checked before any
engine starts (a missing model, an unreadable data file, a level field absent when asked for:
one line naming it). Each model runs in its own torchrun job on `--tp` ranks (`evals/run_one.py`),
so one engine's memory is gone before the next starts; every sample lands in
OUT/models/<i>.responses.jsonl (text, tokens, reward, gold).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from agpo_megatron.data.datasets import DEFAULT_PROMPT_TEMPLATE, DatasetConfig, DatasetError
from agpo_megatron.evals.sources import ModelSource, ModelSourceError, checkpoint_shell, resolve_source


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="agpo eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="HF folder or Megatron step folder (repeatable)")
    p.add_argument("--label", action="append", default=None, help="a name per --model, in order (default: folder)")
    p.add_argument("--data", required=True, help=".jsonl / .json / .parquet file")
    p.add_argument("--n", type=int, default=4, help="samples per problem (pass@1 is their mean)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=3000)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size (torchrun ranks per model)")
    p.add_argument("--dtype", default="auto", help="vLLM dtype: auto (config.json's), bfloat16, float32, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--prompt-field", default="problem")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--answer-format", default="raw", choices=("raw", "boxed", "gsm8k"))
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument(
        "--level-field",
        default=None,
        help="per-level table by this field (default: `level` when the data has it; `none`: no table)",
    )
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip a checkpoint's checksums")
    args = p.parse_args(argv)
    if args.n < 1 or args.tp < 1:
        p.error("--n and --tp must be >= 1")
    if args.temperature == 0 and args.n != 1:
        p.error("--temperature 0 is greedy: every sample would be the same, use --n 1")
    if args.label is not None and len(args.label) != len(args.model):
        p.error(f"--label given {len(args.label)} times for {len(args.model)} --model")
    return args


def _level_fields(args: argparse.Namespace, base: DatasetConfig) -> tuple[str, ...]:
    from agpo_megatron.data.datasets import _read_rows  # the loader's own reader: same errors, same rows

    if args.level_field == "none":
        return ()
    rows = _read_rows(base)  # an unreadable file fails here, naming it (and the line)
    if not rows:
        raise DatasetError(f"--data {args.data}: no rows")
    if args.level_field is None:
        return ("level",) if "level" in rows[0][1] else ()
    for where, row in rows:
        if args.level_field not in row:
            raise DatasetError(f"{where}: no field {args.level_field!r} (--level-field; the row has {sorted(row)})")
    return (args.level_field,)


def _dtype(args: argparse.Namespace, hf_dir: Path) -> str:
    if args.dtype != "auto":
        return args.dtype
    cfg = json.loads((hf_dir / "config.json").read_text())
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")


def prepare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Check every input and write one job per model; nothing heavy is started here."""
    from agpo_megatron.data.datasets import load_examples
    from agpo_megatron.models.hf_config import load_tokenizer

    out = Path(args.out)
    sources: list[ModelSource] = [resolve_source(m) for m in args.model]
    base = DatasetConfig(
        path=args.data,
        prompt_field=args.prompt_field,
        answer_field=args.answer_field,
        answer_format=args.answer_format,
        prompt_template=args.prompt_template,
        max_prompt_tokens=args.max_prompt_tokens,
        limit=args.limit,
    )
    if not Path(args.data).is_file():
        raise DatasetError(f"--data {args.data}: no such file")
    data = dict(base.__dict__, metadata_fields=_level_fields(args, base))
    labels = args.label or [Path(m).name or m for m in args.model]
    if len(set(labels)) != len(labels):
        labels = [f"{i + 1}:{label}" for i, label in enumerate(labels)]
    jobs = []
    for i, (src, label) in enumerate(zip(sources, labels)):
        hf_dir = src.path if src.kind == "hf" else checkpoint_shell(src.path, out / "models" / f"{i}")
        # The data and the fields, read as the engine job will read them: errors now, not after start-up.
        load_examples(DatasetConfig(**data), load_tokenizer(hf_dir))
        jobs.append(
            {
                "label": label,
                "model": str(src.path),
                "kind": src.kind,
                "hf_dir": str(hf_dir),
                "data": {**data, "metadata_fields": list(data["metadata_fields"])},
                "n": args.n,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens,
                "max_model_len": args.max_model_len,
                "tp": args.tp,
                "dtype": _dtype(args, hf_dir),
                "seed": args.seed,
                "verify": args.verify,
                "out": str((out / "models" / f"{i}.json").resolve()),
            }
        )
    return jobs


def _pct(x: float, ref: float) -> str:
    return "" if not ref or math.isnan(x) or math.isnan(ref) else f" ({100 * (x / ref - 1):+.0f}%)"


def _f(x: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(scale * x, fmt)


def tables(results: dict[str, dict[str, Any]], n: int) -> str:
    """The overall table and, when levels exist, the per-level table in the paper's layout
    (accuracy and tokens per level; % change of tokens against the first model)."""
    labels = list(results)
    ref = results[labels[0]]
    head = ["model", "pass@1", f"pass@{n}", "tokens", "tokens (correct)", "tokens (wrong)", "truncated"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label in labels:
        r = results[label]
        first = label == labels[0]
        d_acc = "" if first else f" ({100 * (r['pass@1'] - ref['pass@1']):+.1f})"
        d_tok = "" if first else _pct(r["mean_tokens"], ref["mean_tokens"])
        lines.append(
            f"| {label} | {_f(r['pass@1'], '.1f', 100)}{d_acc} | {_f(r.get(f'pass@{n}'), '.1f', 100)} | "
            f"{_f(r['mean_tokens'], '.0f')}{d_tok} | "
            f"{_f(r['mean_tokens_correct'], '.0f')} | {_f(r['mean_tokens_wrong'], '.0f')} | "
            f"{_f(r['truncated'], '.1f', 100)}% |"
        )
    levels = sorted(
        {k.split("/")[0].removeprefix("level") for r in results.values() for k in r if k.endswith("/pass@1")},
        key=lambda s: (len(s), s),
    )
    if levels:
        cols = [*[f"level{lv}/" for lv in levels], ""]
        names = [*[f"Level {lv}" for lv in levels], "All"]
        lines += ["", "| model | " + " | ".join(f"{c} acc | {c} tokens" for c in names) + " |"]
        lines.append("|---|" + "---:|" * (2 * len(cols)))
        for label in labels:
            r, cells = results[label], []
            for c in cols:
                tok = r.get(f"{c}mean_tokens", float("nan"))
                cells += [
                    _f(r.get(f"{c}pass@1"), ".1f", 100),
                    _f(tok, ".0f")
                    + ("" if label == labels[0] else _pct(tok, ref.get(f"{c}mean_tokens", float("nan")))),
                ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from agpo_megatron.checkpoint import CheckpointError
    from agpo_megatron.runtime.parallel import torchrun_cmd

    args = parse_args(argv)
    try:
        jobs = prepare(args)
    except (ModelSourceError, DatasetError, CheckpointError, OSError, ValueError) as e:
        print(f"agpo eval: error: {e}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    for job in jobs:
        spec = Path(job["out"]).with_suffix(".job.json")
        spec.write_text(json.dumps(job, indent=2))
        Path(job["out"]).unlink(missing_ok=True)
        print(f"== {job['label']}: {job['model']} ({job['kind']})", flush=True)
        rc = subprocess.call(torchrun_cmd(args.tp, "-m", "agpo_megatron.evals.run_one", str(spec)))
        if rc != 0 or not Path(job["out"]).is_file():
            print(f"agpo eval: error: {job['label']} ({job['model']}) failed (exit {rc})", file=sys.stderr)
            return rc or 1
        results[job["label"]] = json.loads(Path(job["out"]).read_text())["metrics"]
    md = tables(results, args.n)
    settings = (
        f"{args.data}, n={args.n}, temperature={args.temperature}, top_p={args.top_p}, "
        f"max_new_tokens={args.max_new_tokens}"
    )
    (out / "eval.md").write_text(f"{settings}\n\n{md}\n")
    (out / "eval.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(f"\n{settings}\n\n{md}\n\nwrote {out / 'eval.md'} and {out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
