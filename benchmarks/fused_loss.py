"""Memory and time of the token-level policy loss at Qwen's vocabulary: plain, Megatron, fused.

    python benchmarks/fused_loss.py --tokens 1024 --chunk-tokens 256 1024 --repeats 3

One micro-batch of `--tokens` tokens, hidden size `--hidden`, vocabulary `--vocab` (TP=1, fp32:
bf16 matmuls on a CPU without AMX are ~5x slower than fp32 and would only measure that), the
same AGPO loss (PPO clip, k3 KL, entropy bonus, token-mean) on top of:

- naive: logits = hidden @ W.T, a full fp32 log_softmax, entropy from the full softmax;
- megatron: logits = hidden @ W.T, Megatron's `vocab_parallel_cross_entropy` for log p(target),
  plus the same entropy computed separately (Megatron has none);
- fused/C: `fused_policy_loss_from_hidden` with `chunk_tokens=C` (gradients computed eagerly in
  forward: 3 vocab-sized matmuls, saves d_hidden and a weight-sized d_W);
- fused-logits/C: logits = hidden @ W.T by autograd, then `fused_policy_loss_from_logits` (saves
  the logits, which the model's output layer produces anyway, and no fp32 copies; no recompute).

Per variant:

- saved for backward: unique storage bytes of every tensor autograd saves during the forward,
  counted with `torch.autograd.graph.saved_tensors_hooks`; "excl. weight-sized" leaves out the storage
  of every weight-shaped (`[V, H]` or `[H, V]`) tensor: the weight itself (a parameter, alive anyway),
  which the other variants save, or the fused variant's eager d_W (it becomes the weight's
  `.grad`, which every variant allocates in backward anyway);
- peak RSS: a fresh subprocess per variant builds the inputs, resets the RSS high-water mark,
  runs forward + backward once and reports `VmHWM`, also as the increase over the RSS at reset;
- time: median wall and CPU (process) time of forward + backward over `--repeats` runs in this
  process, the variants taking turns (the machine may be shared: CPU time is the steadier one).

Ratios are against naive from the same run. The variants' losses and gradients are checked to
agree before anything is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from agpo_megatron.algo.loss import PolicyLossConfig, policy_loss
from agpo_megatron.ops.fused_loss import fused_policy_loss_from_hidden, fused_policy_loss_from_logits
from agpo_megatron.runtime.parallel import exit_cleanly

BASELINES = ("naive", "megatron")
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CFG = PolicyLossConfig(kl_coef=0.01, kl_estimator="k3", entropy_coef=0.001, agg_mode="token-mean")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=3584, help="Qwen2.5-7B")
    p.add_argument("--vocab", type=int, default=152064, help="Qwen2.5")
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[256, 1024], help="one fused variant per value")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)  # a variant's name: the peak-RSS subprocess
    return p.parse_args()


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(1, n, h, generator=g)
    weight = torch.randn(v, h, generator=g).div_(h**0.5)  # logits with unit scale; in place, no 2nd copy
    targets = torch.randint(0, v, (1, n), generator=g)
    lp_guess = torch.full((1, n), -float(torch.log(torch.tensor(v))))  # ~ uniform policy
    return dict(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        mask=torch.ones(1, n, dtype=torch.bool),
        adv=torch.randn(1, generator=g),
        old=lp_guess + 0.1 * torch.randn(1, n, generator=g),
        ref=lp_guess + 0.1 * torch.randn(1, n, generator=g),
    )


def _entropy(logits: torch.Tensor) -> torch.Tensor:  # [1, N, V] -> [1, N]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def loss_naive(x: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = x["hidden"] @ x["weight"].T  # [1, N, V]
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, x["targets"][..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return policy_loss(lp, x["old"], x["adv"], x["mask"], CFG, ref_logprobs=x["ref"], entropy=ent)[0]


def loss_megatron(x: dict[str, torch.Tensor]) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = x["hidden"] @ x["weight"].T
    # Entropy first: Megatron's cross entropy shifts and exponentiates fp32 logits in place.
    ent = _entropy(logits)
    lp = -vocab_parallel_cross_entropy(logits, x["targets"])
    return policy_loss(lp, x["old"], x["adv"], x["mask"], CFG, ref_logprobs=x["ref"], entropy=ent)[0]


def loss_fused(x: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    return fused_policy_loss_from_hidden(
        x["hidden"],
        x["weight"],
        x["targets"],
        x["old"],
        x["adv"],
        x["mask"],
        CFG,
        ref_logprobs=x["ref"],
        chunk_tokens=chunk_tokens,
    )[0]


def loss_fused_logits(x: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    return fused_policy_loss_from_logits(
        x["hidden"] @ x["weight"].T,
        x["targets"],
        x["old"],
        x["adv"],
        x["mask"],
        CFG,
        ref_logprobs=x["ref"],
        chunk_tokens=chunk_tokens,
    )[0]


def variants(args: argparse.Namespace) -> list[str]:
    return [*BASELINES, *(f"fused/{c}" for c in args.chunk_tokens), f"fused-logits/{args.chunk_tokens[0]}"]


def run_variant(name: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "naive":
        return loss_naive(x)
    if name == "megatron":
        return loss_megatron(x)
    kind, chunk_tokens = name.split("/")
    if kind == "fused-logits":
        return loss_fused_logits(x, int(chunk_tokens))
    return loss_fused(x, int(chunk_tokens))


def saved_bytes(fn, weight_shape: torch.Size) -> tuple[int, int, torch.Tensor]:
    """Unique bytes saved for backward by `fn()`, the part of them in weight-shaped tensors (the
    weight, or its transpose, or a d_W), and `fn()`'s output."""
    storages: dict[int, int] = {}
    weight_sized: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        if t.shape in (weight_shape, weight_shape[::-1]):
            weight_sized[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), sum(weight_sized.values()), out


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def child(args: argparse.Namespace) -> None:
    """Forward + backward once in a fresh process; print RSS numbers as JSON."""
    if args.child == "megatron":
        init_world_of_one()
    x = make_inputs(args)
    # Reset the high-water mark (Linux: "5" > clear_refs), so that the peak is the loss's, not
    # that of building the inputs.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    run_variant(args.child, x).backward()
    print(json.dumps({"peak": _status_bytes("VmHWM"), "base": base}))
    exit_cleanly(0)


def init_world_of_one() -> None:
    # vocab_parallel_cross_entropy reads Megatron's TP group: a world of one, gloo.
    from agpo_megatron.runtime.parallel import init_model_parallel

    init_model_parallel(1, 1, seed=0)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    torch.manual_seed(0)
    init_world_of_one()
    print(
        f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} chunk_tokens={args.chunk_tokens} "
        f"fp32 threads={torch.get_num_threads()} repeats={args.repeats}",
        flush=True,
    )

    x = make_inputs(args)
    results: dict[str, dict] = {name: dict(wall=[], cpu=[]) for name in variants(args)}
    reference: dict[str, torch.Tensor] | None = None
    for i in range(args.repeats):
        # Round-robin, so that load from other processes on the machine drifts over all alike.
        for name in results:
            r = results[name]
            x["hidden"].grad = x["weight"].grad = None
            wall, cpu = time.perf_counter(), time.process_time()
            if i == 0:
                total, weight_sized, loss = saved_bytes(lambda name=name: run_variant(name, x), x["weight"].shape)
                r.update(saved=total, saved_excl=total - weight_sized)
            else:
                loss = run_variant(name, x)
            loss.backward()
            r["wall"].append(time.perf_counter() - wall)
            r["cpu"].append(time.process_time() - cpu)
            print(f"round {i} {name}: wall {r['wall'][-1]:.1f} s, cpu {r['cpu'][-1]:.1f} s", flush=True)
            if i == 0:  # same loss and gradients, or the comparison means nothing
                got = dict(loss=loss.detach(), d_hidden=x["hidden"].grad, d_weight_norm=x["weight"].grad.norm())
                reference = reference or got
                for key, value in got.items():
                    err = ((value - reference[key]).abs().max() / reference[key].abs().max()).item()
                    if not err < 1e-4:
                        raise SystemExit(f"{name}: {key} differs from naive by {err:.2e} (relative to max)")
            del loss
    x["hidden"].grad = x["weight"].grad = None

    for name in results:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--tokens",
            str(args.tokens),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
        ]
        # Without the rendezvous variables this process set for itself (a child's world of one).
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[name].update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: peak RSS {gib(results[name]['peak'])}", flush=True)

    naive = results["naive"]
    print(
        "\n| variant | saved for backward | excl. weight-sized | naive / this (excl. weight-sized) | peak RSS "
        "| RSS increase | this / naive | wall time | this / naive | CPU time | this / naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rss_inc, naive_inc = r["peak"] - r["base"], naive["peak"] - naive["base"]
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        fewer = naive["saved_excl"] / r["saved_excl"]
        print(
            f"| {name} | {gib(r['saved'])} | {gib(r['saved_excl'])} | {fewer:.1f}x "
            f"| {gib(r['peak'])} | {gib(rss_inc)} | {rss_inc / naive_inc:.2f}x "
            f"| {wall:.1f} s | {wall / statistics.median(naive['wall']):.2f}x "
            f"| {cpu:.1f} s | {cpu / statistics.median(naive['cpu']):.2f}x |"
        )
    exit_cleanly(0)


if __name__ == "__main__":
    main()
