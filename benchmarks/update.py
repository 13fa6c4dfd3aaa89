"""The RL update phase: Megatron's `Actor.policy_step` against a plain transformers + AdamW step.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc-per-node=2 benchmarks/update.py --repeats 5

The demo's shape: its tiny Qwen2 model (hidden 128, 4 layers, head dim 32, vocab 128, fp32), 16
prompts x G=8 completions of `--new-tokens` tokens (the demo's prompts, random response tokens,
random advantages), split over DP=2 ranks (gloo) into micro-batches of the demo's
`batch.micro_batch_size` (32, so 2 per rank), with the demo's optimizer and loss settings
(examples/demo_cpu.yaml). Old log-probs are the actor's own (ratio 1 at the first step).

- megatron: `Actor.policy_step` (Megatron's schedule, DDP grad reduction, the distributed
  optimizer, grad clipping), exactly what the trainer times as "update";
- hf: `HFUpdate.step`, the same micro-batches through `AutoModelForCausalLM` (causal mask only,
  as Megatron gets), the same `algo.loss.policy_loss` on a plain fp32 log-softmax, backward, ONE
  flat gloo all-reduce of all grads (what torch DDP does with one bucket; DP=2 equivalent), grad
  clipping at the same norm, `torch.optim.AdamW` at the same hyper-parameters.

Both run in the same processes, taking turns within each round (the machine may be shared), after
one untimed warm-up step each. Times are rank 0's medians over `--repeats`; "CPU" is the process
time (`time.process_time`), steadier than wall time on a shared machine. `--breakdown` also
splits each step into forward+backward, grad reduction and optimizer step (CPU time, summed per
step); Megatron's "grad reduction" is `finalize_model_grads` (the reduce-scatter of the
distributed optimizer, or the all-reduce) and its optimizer step includes the param all-gather.

`--breakdown` also counts the torch calls that the CPU layer's device-rewriting TorchFunctionMode
(runtime/cpu_platform.py, `megatron_scope`, entered around the schedule and the optimizer step)
intercepts in one Megatron step, and times that mode's cost per call on a tiny op in the same
process: calls x cost is the mode's share of the step.

`hf_update_baseline(...)` is importable: other benchmarks can time the baseline on their own
micro-batches.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo_cpu.yaml"

_phase_times: collections.defaultdict[str, float] = collections.defaultdict(float)
"""CPU (process) seconds per phase of the current step, filled by `_timed` when --breakdown is on.
CPU rather than wall time: a rank waiting in a collective for a straggler burns little CPU."""


@contextlib.contextmanager
def _timed(phase: str):
    start = time.process_time()
    try:
        yield
    finally:
        _phase_times[phase] += time.process_time() - start


class HFUpdate:
    """A plain data-parallel transformers policy update: forward, backward, all-reduce, clip, AdamW.

    Every rank holds a full replica; `step()` is collective over the default group (gloo on CPU).
    """

    def __init__(self, hf_dir: str | Path, optim_cfg, loss_cfg, *, temperature: float = 1.0):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=optim_cfg.lr,
            betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
            eps=optim_cfg.adam_eps,
            weight_decay=optim_cfg.weight_decay,
        )
        self.clip_grad, self.loss_cfg, self.temperature = optim_cfg.clip_grad, loss_cfg, temperature

    def step(
        self,
        micro_batches,
        *,
        global_num_tokens: int,
        global_num_seqs: int,
        kl_coef: float = 0.0,
        eps: tuple[float, float] | None = None,
    ) -> float:
        """One optimizer step over this rank's micro-batches; returns the local loss sum."""
        from agpo_megatron.algo.loss import policy_loss
        from agpo_megatron.runtime.parallel import comm_device

        eps = eps or (self.loss_cfg.eps_low, self.loss_cfg.eps_high)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        total = 0.0
        with _timed("forward+backward"):
            for mb in micro_batches:
                logits = self.model(input_ids=mb["tokens"], use_cache=False).logits  # [B, S, V]
                logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
                lp = logp.gather(-1, mb["targets"].unsqueeze(-1)).squeeze(-1)  # [B, S]
                loss, _ = policy_loss(
                    lp,
                    mb["old_logprobs"],
                    mb["advantages"],
                    mb["loss_mask"],
                    self.loss_cfg,
                    ref_logprobs=mb.get("ref_logprobs"),
                    kl_coef=kl_coef,
                    eps_low=eps[0],
                    eps_high=eps[1],
                    global_num_tokens=global_num_tokens,
                    global_num_seqs=global_num_seqs,
                )
                loss.backward()
                total += float(loss.detach())
        with _timed("grad reduction"):
            if dist.is_initialized() and dist.get_world_size() > 1:
                grads = [p.grad for p in self.params]
                flat = torch._utils._flatten_dense_tensors(grads).to(comm_device())
                dist.all_reduce(flat)  # the loss is normalised by global counts: a sum, not a mean
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)
        with _timed("optimizer step"):
            if self.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            self.optimizer.step()
        return total


def hf_update_baseline(
    hf_dir: str | Path,
    micro_batches,
    *,
    optim_cfg,
    loss_cfg,
    global_num_tokens: int,
    global_num_seqs: int,
    repeats: int = 3,
    temperature: float = 1.0,
) -> list[float]:
    """Wall seconds of `repeats` HF update steps on these micro-batches (after one warm-up step).

    Collective: call on every rank of the default group with this rank's micro-batches.
    """
    hf = HFUpdate(hf_dir, optim_cfg, loss_cfg, temperature=temperature)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        hf.step(micro_batches, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)
        if i:
            times.append(time.perf_counter() - start)
    return times


def demo_micro_batches(
    tokenizer,
    *,
    prompts: int,
    group: int,
    new_tokens: int,
    micro_batch_size: int,
    pad_id: int,
    dp_rank: int,
    dp: int,
    pad_to_multiple: int = 8,
    seed: int = 0,
):
    """The demo's step shape with fixed-length random responses: (this rank's micro-batches,
    global response tokens, global sequences). Identical on every rank (seeded)."""
    from agpo_megatron.data import synthetic
    from agpo_megatron.train import batch as batching

    gen = torch.Generator().manual_seed(seed)
    questions = [tokenizer.encode(r["question"]) for r in synthetic.make_dataset(prompts, seed=seed, max_difficulty=1)]
    vocab = len(tokenizer)
    tokens = [
        q + torch.randint(4, vocab, (new_tokens,), generator=gen).tolist() for q in questions for _ in range(group)
    ]
    seqs = batching.Sequences(
        tokens=tokens,
        prompt_lens=[len(q) for q in questions for _ in range(group)],
        advantages=torch.randn(prompts * group, generator=gen),
    )
    per_rank = len(seqs) // dp
    mine = seqs.select(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    mbs = batching.split_micro_batches(
        mine,
        micro_batch_size=micro_batch_size,
        max_tokens=None,
        pad_id=pad_id,
        uniform_length=False,
        pad_to_multiple=pad_to_multiple,
    )
    return mbs, seqs.num_response_tokens(), len(seqs)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--breakdown", action="store_true", help="split each step into phases (see above)")
    p.add_argument("--work-dir", default="/tmp/agpo_update_bench")
    p.add_argument("overrides", nargs="*", help="dotted config overrides on examples/demo_cpu.yaml")
    return p.parse_args()


def _instrument_megatron() -> None:
    """Wrap Megatron's grad reduction and the actor's optimizer step in `_timed` (for --breakdown)."""
    import agpo_megatron.models.forward as fwd
    from agpo_megatron.train import policy

    inner_finalize = fwd._finalize_without_token_scaling

    def finalize(*a, **k):
        with _timed("grad reduction"):
            return inner_finalize(*a, **k)

    fwd._finalize_without_token_scaling = finalize
    inner_fb = fwd.forward_backward

    def forward_backward(*a, **k):
        start, before = time.process_time(), _phase_times["grad reduction"]
        out = inner_fb(*a, **k)
        _phase_times["forward+backward"] += time.process_time() - start - (_phase_times["grad reduction"] - before)
        return out

    policy.forward.forward_backward = forward_backward
    inner_scope = policy.cpu_platform.megatron_scope

    @contextlib.contextmanager
    def scope():  # train_step enters it around optimizer.step() only
        with _timed("optimizer step"), inner_scope():
            yield

    policy.cpu_platform = type("P", (), {"megatron_scope": staticmethod(scope)})


def mode_share(step_fn) -> tuple[int, float]:
    """The device-rewriting TorchFunctionMode's share of one Megatron step: (torch calls it
    intercepted during `step_fn()`, its cost per call in seconds, measured here on a tiny op with
    and without the mode). Collective when `step_fn` is."""
    from agpo_megatron.runtime import cpu_platform as cpu

    calls = 0
    inner = cpu._CudaToCpuMode.__torch_function__

    def counting(self, func, types_, args=(), kwargs=None):
        nonlocal calls
        calls += 1
        return inner(self, func, types_, args, kwargs)

    cpu._CudaToCpuMode.__torch_function__ = counting
    try:
        step_fn()
    finally:
        cpu._CudaToCpuMode.__torch_function__ = inner
    x, n = torch.ones(8), 20000

    def per_op() -> float:
        start = time.process_time()
        for _ in range(n):
            torch.add(x, x)
        return (time.process_time() - start) / n

    plain = min(per_op() for _ in range(3))
    with cpu.megatron_scope():
        moded = min(per_op() for _ in range(3))
    return calls, moded - plain


def main() -> None:
    args = parse_args()
    from agpo_megatron.models.hf_config import read_arch
    from agpo_megatron.models.inputs import write_tiny_model
    from agpo_megatron.plan.load import load_train_config
    from agpo_megatron.runtime.parallel import (
        exit_cleanly,
        init_distributed,
        init_model_parallel,
    )
    from agpo_megatron.train.policy import Actor

    work = Path(args.work_dir)
    init_distributed()
    rank = dist.get_rank()
    if rank == 0:
        write_tiny_model(work / "model", "qwen2", seed=0)
    dist.barrier()
    cfg = load_train_config(str(EXAMPLE), [f"model.hf_path={work / 'model'}", *args.overrides])
    layout = init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.parallel.seed)
    from agpo_megatron.models.hf_config import load_tokenizer

    tok = load_tokenizer(work / "model")
    arch = read_arch(work / "model")
    actor = Actor(arch, cfg, layout, total_steps=1000)
    mbs, global_tokens, global_seqs = demo_micro_batches(
        tok,
        prompts=args.prompts,
        group=args.group,
        new_tokens=args.new_tokens,
        micro_batch_size=cfg.batch.micro_batch_size,
        pad_id=tok.pad_token_id,
        dp_rank=layout.dp_rank,
        dp=layout.dp,
        pad_to_multiple=actor.pad_multiple,
    )
    for mb, out in zip(mbs, actor.logprobs(mbs, temperature=cfg.rollout.temperature)):
        mb["old_logprobs"] = out["logprobs"]
    hf = HFUpdate(work / "model", cfg.optim, cfg.algo.loss, temperature=cfg.rollout.temperature)
    loss_cfg, kl = cfg.algo.loss, cfg.algo.loss.kl_coef
    if kl > 0:
        raise SystemExit("this benchmark runs without a reference model: use algo.loss.kl_coef=0")
    if args.breakdown:
        _instrument_megatron()

    eps = (loss_cfg.eps_low, loss_cfg.eps_high)
    runs = {
        "megatron (Actor.policy_step)": lambda: actor.policy_step(
            mbs,
            loss_cfg,
            temperature=cfg.rollout.temperature,
            global_num_tokens=global_tokens,
            global_num_seqs=global_seqs,
            kl_coef=kl,
            eps=eps,
        ),
        "hf (transformers + AdamW + all-reduce)": lambda: hf.step(
            mbs, global_num_tokens=global_tokens, global_num_seqs=global_seqs, kl_coef=kl, eps=eps
        ),
    }
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    phases = {k: collections.defaultdict(list) for k in runs}
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for name, fn in runs.items():
            dist.barrier()
            _phase_times.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sec, sec_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if rnd:
                wall[name].append(sec)
                cpu[name].append(sec_cpu)
                for phase, t in _phase_times.items():
                    phases[name][phase].append(t)

    if args.breakdown:
        calls, per_call = mode_share(runs["megatron (Actor.policy_step)"])
    if rank == 0:
        shapes = sorted({tuple(mb["tokens"].shape) for mb in mbs})
        print(
            f"\nmodel: {arch.model_type} hidden {arch.hidden_size}, {arch.num_layers} layers, vocab "
            f"{arch.vocab_size}, {cfg.model.params_dtype}; world {dist.get_world_size()} (DP={layout.dp}, "
            f"TP={layout.tp}, PP={layout.pp}), {dist.get_backend()}; {args.prompts} prompts x G={args.group} x "
            f"{args.new_tokens} tokens = {global_seqs} sequences, {global_tokens} response tokens; per rank "
            f"{len(mbs)} micro-batches {shapes}; distributed optimizer "
            f"{cfg.parallel.use_distributed_optimizer}, fused loss {cfg.algo.fused_loss}; torch threads "
            f"{torch.get_num_threads()}; rank 0, median of {args.repeats}\n"
        )
        hf_name = list(runs)[-1]
        base, base_cpu = statistics.median(wall[hf_name]), statistics.median(cpu[hf_name])
        print("| update | wall (s) | vs hf | CPU (s) | vs hf (CPU) |")
        print("|---|---:|---:|---:|---:|")
        for name in runs:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            print(
                f"| {name} | {w:.3f} ({min(wall[name]):.3f}-{max(wall[name]):.3f}) | {w / base:.2f}x "
                f"| {c:.3f} | {c / base_cpu:.2f}x |"
            )
        if args.breakdown:
            print("\n| phase (CPU s, median) | " + " | ".join(runs) + " |")
            print("|---|" + "---:|" * len(runs))
            for phase in ("forward+backward", "grad reduction", "optimizer step"):
                cells = [f"{statistics.median(phases[n][phase]):.3f}" if phases[n][phase] else "-" for n in runs]
                print(f"| {phase} | " + " | ".join(cells) + " |")
            meg = statistics.median(cpu["megatron (Actor.policy_step)"])
            print(
                f"\nTorchFunctionMode: {calls} torch calls intercepted per Megatron step, "
                f"{per_call * 1e6:.2f} us CPU each (tiny op, with minus without the mode) = "
                f"{calls * per_call * 1e3:.1f} ms, {100 * calls * per_call / meg:.1f}% of the step's CPU time"
            )
        sys.stdout.flush()
    exit_cleanly(0)


if __name__ == "__main__":
    main()
