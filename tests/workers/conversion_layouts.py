"""2-rank worker: converted checkpoints at TP/PP layouts, resharding, and the trainer's resume.

argv: OUT_DIR NAME=HF_DIR:CKPT_DIR ... (each CKPT_DIR converted from HF_DIR in one process).
For each model:
  - logits and log-probs at (TP, PP) = (1, 1), (2, 1), (1, 2)      -> OUT_DIR/<name>_tp<T>pp<P>.pt
  - at TP=2: save_checkpoint (the trainer's path), then load at PP=2 -> OUT_DIR/<name>_reshard.pt
For the first model only:
  - the converter runs in this 2-rank world and writes native TP=2 and PP=2 layouts. Each is
    loaded at the other layout, and at TP=1, where its parameters must equal the HF weights
    bit for bit                                                      -> OUT_DIR/native.pt
    and exported back to HF by rank 0                                -> OUT_DIR/native_<layout>_hf
  - trainer resume at DP=2 with the distributed optimizer: train 2 steps, save, take a 3rd step;
    a fresh model + optimizer + scheduler loaded from the save must take the same 3rd step,
    bit for bit                                                      -> OUT_DIR/resume.pt
Results come from the last pipeline stage's TP rank 0 (DP rank 0) unless noted.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.cpu_platform import megatron_scope
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from checkpoints_conversion.hf_to_megatron import convert_hf_to_megatron, inspect_source
from checkpoints_conversion.megatron_to_hf import convert_megatron_to_hf

MODEL_CFG = ModelConfig(params_dtype="float32", spec="local", max_seq_len=64)


def tokens(vocab: int) -> torch.Tensor:  # [4, 24]
    return torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))


def build_at(arch, tp: int, pp: int):
    lay = init_model_parallel(tp, pp, seed=1)
    return lay, build.build_gpt(arch, MODEL_CFG, ParallelConfig(tp=tp, pp=pp))


def logits_and_logprobs(model, arch) -> dict[str, torch.Tensor] | None:
    """Full-vocabulary logits (gathered over TP) and log-probs, on the last stage; else None."""
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    toks = tokens(arch.vocab_size)
    mbs = [{"tokens": t, "targets": torch.roll(t, -1, dims=1)} for t in toks.split(2)]

    def collect(logits, mb):
        lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
        full = gather_from_tensor_model_parallel_region(logits)  # [B, S, V]
        return torch.zeros(()), {"logits": full.detach(), "logprobs": lp.detach()}

    res = forward.forward_backward(model, mbs, collect, forward_only=True)
    return {k: torch.cat([r[k] for r in res]) for k in ("logits", "logprobs")} if res else None


def save_result(lay, path: Path, result: dict | None, **extra) -> None:
    if lay.is_last_stage and lay.tp_rank == 0 and lay.dp_rank == 0:
        torch.save({**result, **extra}, path)
    dist.barrier()


def main() -> None:
    out = Path(sys.argv[1])
    models = {name: spec.split(":") for name, spec in (a.split("=", 1) for a in sys.argv[2:])}
    for name, (hf_dir, ckpt) in models.items():
        arch = read_arch(hf_dir)
        for tp, pp in [(1, 1), (2, 1), (1, 2)]:
            lay, model = build_at(arch, tp, pp)
            load_checkpoint(ckpt, [model])
            save_result(lay, out / f"{name}_tp{tp}pp{pp}.pt", logits_and_logprobs(model, arch))
            if (tp, pp) == (2, 1):
                save_checkpoint(
                    out / f"{name}_saved_tp2",
                    [model],
                    step=7,
                    hf_dir=hf_dir,
                    extra_state={"model": name, "seen": torch.arange(3)},
                )
        lay, model = build_at(arch, 1, 2)
        restored = load_checkpoint(out / f"{name}_saved_tp2", [model])
        save_result(
            lay,
            out / f"{name}_reshard.pt",
            logits_and_logprobs(model, arch),
            step=restored.step,
            extra_state=restored.extra_state,
        )

    name, (hf_dir, _) = next(iter(models.items()))
    arch = read_arch(hf_dir)
    native = {}
    for (tp, pp), (load_tp, load_pp) in [((2, 1), (1, 2)), ((1, 2), (2, 1))]:
        init_model_parallel(tp, pp, seed=1)
        ckpt = out / f"native_tp{tp}pp{pp}"
        convert_hf_to_megatron(inspect_source(hf_dir, tp=tp, pp=pp), ckpt)
        lay, model = build_at(arch, load_tp, load_pp)
        load_checkpoint(ckpt, [model])
        result = logits_and_logprobs(model, arch)
        if result is not None:
            native[f"tp{tp}pp{pp}"] = result["logits"]
        lay, model = build_at(arch, 1, 1)
        load_checkpoint(ckpt, [model])
        _, ref = build_at(arch, 1, 1)
        load_hf_weights(ref, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1)
        ref_params = dict(ref.named_parameters())
        native[f"tp{tp}pp{pp}_unequal"] = [n for n, p in model.named_parameters() if not torch.equal(p, ref_params[n])]
    # Export both native checkpoints (one process reads any layout; rank 1 waits).
    init_model_parallel(1, 1, seed=1)
    if dist.get_rank() == 0:
        for layout in ("tp2pp1", "tp1pp2"):
            convert_megatron_to_hf(out / f"native_{layout}", out / f"native_{layout}_hf")
    dist.barrier()
    # The logits of a layout come from its last stage: gather both onto rank 0.
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, native)
    if dist.get_rank() == 0:
        torch.save({k: v for d in everyone for k, v in d.items()}, out / "native.pt")

    resume_check(arch, hf_dir, next(iter(models.values()))[1], out)
    exit_cleanly(0)


def resume_check(arch, hf_dir: str, converted: str, out: Path) -> None:
    par = ParallelConfig(tp=1, pp=1, use_distributed_optimizer=True)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, decay_style="cosine")

    def trainable():
        _, model = build_at(arch, 1, 1)
        load_checkpoint(converted, [model])  # weights only, before the optimizer exists
        return build.wrap_for_training(model, optim, par, total_steps=10)

    lay = init_model_parallel(1, 1, seed=1)
    toks = tokens(arch.vocab_size)[2 * lay.dp_rank : 2 * lay.dp_rank + 2]  # this DP rank's half
    mbs = [{"tokens": toks, "targets": torch.roll(toks, -1, dims=1)}]

    def loss_fn(logits, mb):
        lp, _ = forward.vocab_parallel_logprobs(logits, mb["targets"], with_entropy=False)
        return -lp.sum() / (4 * 24), {}  # normalised by the global token count (2 DP ranks x 2 x 24)

    def train_step(ddp, opt, sched) -> None:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        forward.forward_backward([ddp], mbs, loss_fn, forward_only=False)
        with megatron_scope():
            ok, _, _ = opt.step()
        assert ok, "optimizer step skipped"
        sched.step(1)

    ddp, opt, sched = trainable()
    for _ in range(2):
        train_step(ddp, opt, sched)
    saved = out / "resume"
    save_checkpoint(saved, [ddp], opt, sched, extra_state={"epoch": 0}, step=2, hf_dir=hf_dir)
    lr_saved = opt.param_groups[0]["lr"]
    train_step(ddp, opt, sched)
    continued = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    ddp2, opt2, sched2 = trainable()
    restored = load_checkpoint(saved, [ddp2], opt2, sched2)
    lr_at_load, steps_at_load = opt2.param_groups[0]["lr"], sched2.num_steps
    train_step(ddp2, opt2, sched2)
    resumed = dict(ddp2.module.named_parameters())

    # A converted checkpoint holds no optimizer state: asking for it must say so.
    ddp3, opt3, _ = trainable()
    untrained = dict(ddp3.module.named_parameters())
    try:
        load_checkpoint(converted, [ddp3], opt3)
        no_optim_error = ""
    except CheckpointError as e:
        no_optim_error = str(e)
    if lay.rank == 0:
        torch.save(
            {
                "unequal": [n for n, p in continued.items() if not torch.equal(p, resumed[n])],
                "trained": [n for n, p in continued.items() if not torch.equal(p, untrained[n])],
                "step": restored.step,
                "extra_state": restored.extra_state,
                "lr": (lr_saved, lr_at_load),
                "scheduler_steps": steps_at_load,
                "no_optim_error": no_optim_error,
            },
            out / "resume.pt",
        )
    dist.barrier()


if __name__ == "__main__":
    main()
