"""Rollout throughput: the project's vLLM engine against transformers' `generate`, same model and prompts.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rollout.py --prompts 16 --group 8 --new-tokens 128 --repeats 3

One process (a world of one, vLLM TP=1). Both generators sample `--group` completions for each of
`--prompts` synthetic arithmetic prompts (the demo's task, tokenized by its tokenizer), at
temperature 1, no top-k/top-p, from the same tiny Qwen2-shaped model written here (default: the
demo's own, hidden 128, 4 layers, 4 heads of dim 32, vocab 128, fp32; `--hidden/--layers` give a
bigger one, head dim stays 32, vLLM's CPU minimum).

- vLLM: `rollout.vllm_engine.VLLMEngine.generate`, the call the trainer makes (one request per
  prompt with `n=G`, per-prompt seeds), with `ignore_eos=True` set on each request's
  SamplingParams;
- HF: `model.generate` on all P*G rows in one left-padded batch (`--hf-batch` splits it),
  `do_sample=True, top_k=0, top_p=1`, with `eos_token_id=None` in its GenerationConfig.

NOTE: both are forced to generate exactly `--new-tokens` tokens per completion (EOS does not stop
them; checked on every output) so that the same number of tokens is timed on both sides. A
random tiny model emits EOS at arbitrary points, and early stops would favour whichever side
happened to stop first.

Each number is the median over `--repeats` rounds; the two generators take turns within a round
(the machine may be shared, so the load hits both alike) after one untimed warm-up each.
Completion tokens/s counts P*G*new_tokens. The ratio is vLLM over HF from the same run. CPU time
(`time.process_time`, all threads of this process) is reported beside wall time: on a shared
machine it is the steadier of the two (with OMP_NUM_THREADS=1 it is the work done).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128, help="128 = the demo's model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hf-batch", type=int, default=0, help="rows per HF generate call (0 = all P*G in one)")
    p.add_argument("--work-dir", default="", help="where the model is written (default: a temporary directory)")
    return p.parse_args()


def write_model(out: Path, hidden: int, layers: int):
    """The demo's tiny model shape, scaled by hidden/layers (head dim 32, GQA 2:1, FFN 3x)."""
    from agpo_megatron.data import synthetic
    from agpo_megatron.models.tiny import save_tiny_hf_model

    tok = synthetic.build_tokenizer(out)
    heads = hidden // 32
    save_tiny_hf_model(
        out,
        "qwen2",
        seed=0,
        tokenizer=tok,
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok


def make_prompts(tok, n: int) -> list[list[int]]:
    from agpo_megatron.data import synthetic

    return [tok.encode(row["question"]) for row in synthetic.make_dataset(n, seed=0, max_difficulty=1)]


class HFGenerator:
    """transformers' generate on the same prompts: all rows left-padded into one batch."""

    def __init__(self, path: Path, pad_id: int, new_tokens: int, batch_rows: int):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        self.pad_id, self.batch_rows = pad_id, batch_rows
        # eos_token_id=None: no stopping on EOS, and no min-length logits processor either.
        self.gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=0,
            eos_token_id=None,
            pad_token_id=pad_id,
            use_cache=True,
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int, seed: int) -> list[int]:
        """Returns the number of new tokens of every completion (prompt-major, G per prompt)."""
        torch.manual_seed(seed)
        rows = [p for p in prompts for _ in range(n)]
        step = self.batch_rows or len(rows)
        lengths = []
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in chunk])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_cfg)
            lengths += [out.shape[1] - width] * len(chunk)
        return lengths


def fixed_length_engine(path: Path, max_model_len: int):
    """The project's engine, with every request told to ignore EOS (the trainer's call otherwise)."""
    from agpo_megatron.rollout.vllm_engine import VLLMEngine

    class FixedLength(VLLMEngine):
        def _sampling_params(self, sampling, n, prompt_index, seed=None):
            params = super()._sampling_params(sampling, n, prompt_index, seed)
            params.ignore_eos = True
            return params

    return FixedLength(str(path), rollout_tp=1, dtype="float32", max_model_len=max_model_len)


def main() -> None:
    args = parse_args()
    from agpo_megatron.rollout.base import SamplingConfig
    from agpo_megatron.runtime.parallel import exit_cleanly, init_distributed

    init_distributed()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="agpo_rollout_bench_"))
    tok = write_model(work / "model", args.hidden, args.layers)
    prompts = make_prompts(tok, args.prompts)
    expected = args.prompts * args.group * args.new_tokens

    hf = HFGenerator(work / "model", tok.pad_token_id, args.new_tokens, args.hf_batch)
    start = time.perf_counter()
    engine = fixed_length_engine(work / "model", max(len(p) for p in prompts) + args.new_tokens + 8)
    startup = time.perf_counter() - start

    def run_vllm(seed: int) -> list[int]:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, seed=seed)
        return [len(c.token_ids) for g in engine.generate(prompts, n=args.group, sampling=sampling) for c in g]

    runs = {
        "vLLM (VLLMEngine.generate)": run_vllm,
        "HF transformers generate": lambda seed: hf.generate(prompts, args.group, seed),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            lengths = fn(rnd)
            sec, sec_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if sum(lengths) != expected or min(lengths) != args.new_tokens:
                raise SystemExit(f"{name}: {sum(lengths)} tokens generated, expected {expected} (fixed length broke)")
            if rnd:
                times[name].append(sec)
                cpu[name].append(sec_cpu)

    cfg = hf.model.config
    print(
        f"\nmodel: qwen2 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
        f"(dim 32, {cfg.num_key_value_heads} KV), vocab {cfg.vocab_size}, fp32; {args.prompts} prompts "
        f"(prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))}) x G={args.group} x {args.new_tokens} new "
        f"tokens = {expected} completion tokens; torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; median of {args.repeats}; "
        f"vLLM engine start-up {startup:.1f} s; "
        f"HF rows per generate call {args.hf_batch or args.prompts * args.group}\n"
    )
    hf_name = "HF transformers generate"
    base, base_cpu = statistics.median(times[hf_name]), statistics.median(cpu[hf_name])
    print("| generator | wall (s) | completion tokens/s | vs HF | CPU time (s) | tokens per CPU-s | vs HF (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ts in times.items():
        sec, sec_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(
            f"| {name} | {sec:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {expected / sec:.0f} | {base / sec:.2f}x "
            f"| {sec_cpu:.2f} | {expected / sec_cpu:.0f} | {base_cpu / sec_cpu:.2f}x |"
        )
    exit_cleanly(0)


if __name__ == "__main__":
    main()
