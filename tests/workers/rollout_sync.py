"""2-rank worker: sync a Megatron actor into a colocated vLLM engine, compare generations.

argv: VLLM_HF_DIR MEGATRON_HF_DIR OUT_DIR ROLLOUT_TP LAYOUTS LOAD_FORMAT LOGPROB_MODE

vLLM starts from VLLM_HF_DIR (or random weights with LOAD_FORMAT=dummy); Megatron loads a
*different* checkpoint, MEGATRON_HF_DIR, so only the sync can make the two agree. One vLLM engine
serves every Megatron layout in LAYOUTS (comma-separated tp2 / pp2): vLLM's process groups are
its own, so Megatron's parallel state can be rebuilt under it. ep2 (an MoE checkpoint): expert
parallel over the 2 ranks, each holding half the experts. For each layout:

- sync, then greedy-decode with vLLM and with Megatron (full-sequence forward per step);
- Megatron's log-probs of vLLM's greedy tokens (T=1) and of vLLM's samples at T=0.7;
- at tp2 only: perturb the Megatron weights, sync again, and redo both checks.

Each rank writes OUT_DIR/rank{r}.pt: the vLLM results (the global list, on every rank), the
Megatron greedy tokens, and the Megatron log-probs (None off the last pipeline stage). The test
does the comparing.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from agpo_megatron.bridge import names
from agpo_megatron.bridge.export import sync_weights
from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build, forward
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.vllm_engine import VLLMEngine
from agpo_megatron.runtime.parallel import Layout, exit_cleanly, init_model_parallel

vllm_dir, meg_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rollout_tp, layouts, load_format, logprob_mode = int(sys.argv[4]), sys.argv[5].split(","), sys.argv[6], sys.argv[7]
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}  # (tp, pp, ep)
NEW_TOKENS = 16
# vLLM stops at EOS, so the reference decode is cut there too.
EOS = json.loads((meg_dir / "config.json").read_text())["eos_token_id"]

arch = read_arch(meg_dir)
model_cfg = ModelConfig(hf_path=str(meg_dir), params_dtype="float32", spec="local", max_seq_len=64)
g = torch.Generator().manual_seed(0)
# 5 prompts: with 2 replicas the split is uneven (3 + 2). Equal lengths keep the reference batch
# unpadded on the left.
prompts = torch.cat([torch.ones(5, 1, dtype=torch.long), torch.randint(4, arch.vocab_size, (5, 5), generator=g)], 1)
greedy = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS, seed=0, logprobs=True)
sampled = SamplingConfig(temperature=0.7, max_new_tokens=NEW_TOKENS, seed=123, logprobs=True)


def last_rank_of_pp_group() -> int:
    from megatron.core import parallel_state as mpu

    return dist.get_process_group_ranks(mpu.get_pipeline_model_parallel_group())[-1]


def megatron_greedy(model, lay: Layout, steps: int) -> torch.Tensor:  # [B, steps]
    """Plain greedy decoding: a full-sequence forward per new token, argmax over the whole vocab."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def pick_next(logits, mb):  # logits [B, S, V/TP]
        full = gather_from_tensor_model_parallel_region(logits[:, -1].contiguous())  # [B, V]
        return torch.zeros(()), {"next": full.argmax(-1)}

    seq = prompts.clone()
    for _ in range(steps):
        res = forward.forward_backward(model, [{"tokens": seq}], pick_next, forward_only=True)
        nxt = res[0]["next"] if lay.is_last_stage else torch.empty(len(seq), dtype=torch.long)
        if lay.pp > 1:
            dist.broadcast(nxt, src=last_rank_of_pp_group(), group=mpu.get_pipeline_model_parallel_group())
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, prompts.shape[1] :]


def megatron_logprobs(model, rows: list[tuple[int, list[int]]], temperature: float) -> list[list[float]] | None:
    """Megatron's log p(completion token) for each (prompt index, completion), last stage only."""
    width = prompts.shape[1] + max(len(c) for _, c in rows)
    # Right-padding is harmless: causal attention never lets a position see what follows it.
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (i, comp) in enumerate(rows):
        seq = prompts[i].tolist() + comp
        tokens[b, : len(seq)] = torch.tensor(seq)
    res = forward.compute_logprobs(
        model, [{"tokens": tokens, "targets": torch.roll(tokens, -1, 1)}], temperature=temperature
    )
    if not res:
        return None
    lp = res[0]["logprobs"]  # [B, S]: position t scores token t + 1
    start = prompts.shape[1] - 1
    return [lp[b, start : start + len(comp)].tolist() for b, (_, comp) in enumerate(rows)]


def truncate_at_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def perturb(model, lay: Layout, seed: int) -> None:
    """Add layout-independent noise: drawn at full shape per rule, then sharded like the weight."""
    params = dict(model.named_parameters())
    offset = names.layer_range(arch, lay.pp_rank, lay.pp).start
    first_expert = names.expert_offset(arch, lay.ep_rank, lay.ep)
    with torch.no_grad():
        for i, rule in enumerate(names.param_rules(arch)):
            if lay.pp_rank not in names.stage_of(rule, arch, lay.pp):
                continue
            if names.ep_owner(rule, arch, lay.ep) not in (None, lay.ep_rank):
                continue  # another EP rank's expert
            noise = 0.05 * torch.randn(names.full_shape(rule, arch), generator=torch.Generator().manual_seed(seed + i))
            tp_rank, tp = (lay.etp_rank, lay.etp) if rule.expert is not None else (lay.tp_rank, lay.tp)
            params[names.to_local_name(rule.megatron, offset, first_expert)].add_(names.shard(rule, noise, tp_rank, tp))


def as_rows(results: list[list[Completion]]) -> list[dict]:
    return [vars(c) for per_prompt in results for c in per_prompt]


tp, pp, ep = LAYOUTS[layouts[0]]
lay = init_model_parallel(tp, pp, seed=1, ep=ep)
# Megatron's parallel state first, then vLLM, on every rank in the same order.
engine = VLLMEngine(
    str(vllm_dir),
    rollout_tp=rollout_tp,
    logprob_mode=logprob_mode,
    dtype="float32",
    max_model_len=64,
    load_format=load_format,
)
no_logprobs = SamplingConfig(temperature=0.0, max_new_tokens=4)  # logprobs=False
out: dict = {
    "prompts": prompts,
    "pre_sync": as_rows(engine.generate(prompts.tolist(), 1, greedy)),
    "no_logprobs": as_rows(engine.generate(prompts.tolist(), 1, no_logprobs)),
}

for k, name in enumerate(layouts):
    tp, pp, ep = LAYOUTS[name]
    if k:  # the first layout's parallel state was built before the engine
        lay = init_model_parallel(tp, pp, seed=1, ep=ep)
    model = build.build_gpt(arch, model_cfg, ParallelConfig(tp=tp, pp=pp, ep=ep))
    load_hf_weights(
        model,
        arch,
        HFCheckpointReader(meg_dir),
        tp_rank=lay.tp_rank,
        tp=tp,
        pp_rank=lay.pp_rank,
        pp=pp,
        ep_rank=lay.ep_rank,
        ep=ep,
    )
    phases = ["synced", "perturbed"] if name in ("tp2", "ep2") else ["synced"]
    for phase in phases:
        if phase == "perturbed":
            perturb(model, lay, seed=7)
        stats = sync_weights(model, arch, engine, bucket_bytes=64 * 2**10)
        vg = engine.generate(prompts.tolist(), 1, greedy)
        vs = engine.generate(prompts.tolist(), 2, sampled)
        ref_greedy = [truncate_at_eos(r) for r in megatron_greedy(model, lay, NEW_TOKENS).tolist()]
        # Collective through the pipeline: every stage runs it, the last one gets the numbers.
        ref_greedy_lp = megatron_logprobs(model, [(c.prompt_index, c.token_ids) for p in vg for c in p], 1.0)
        ref_sampled_lp = megatron_logprobs(model, [(c.prompt_index, c.token_ids) for p in vs for c in p], 0.7)
        out[f"{name}/{phase}"] = {
            "stats": vars(stats),
            "vllm_greedy": as_rows(vg),
            "vllm_sampled": as_rows(vs),
            "ref_greedy": ref_greedy,
            "ref_greedy_logprobs": ref_greedy_lp,
            "ref_sampled_logprobs": ref_sampled_lp,
        }
    dist.barrier()

torch.save(out, out_dir / f"rank{dist.get_rank()}.pt")
exit_cleanly(0)
