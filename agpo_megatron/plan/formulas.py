"""Memory formulas for one rank, from `config.json` alone: what `agpo plan` (plan/memory.py) adds up.

* Exact (tested against built objects, tests/plan/test_plan.py): this rank's parameter shapes and
  dtypes under TP/PP, Megatron DDP's contiguous buffers with their padding (the bf16 param buffer
  of the distributed optimizer and the fp32 grad buffer), and the optimizer's fp32 main params +
  Adam m, v on this data-parallel rank's shard.
* Estimates: activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Sec. 4; MoE layers: the router and the routed experts' rows under balanced
  routing, plus the token dispatcher's buffers), the loss working set (ops/fused_loss.py's own
  accounting), vLLM's weights (split as vLLM splits them) and KV bytes per token.

Departures and simplifications:
- `model.spec: auto` is planned as Transformer Engine (the GPU target), whatever this machine has.
- The local spec's norms are fp32 parameters: Megatron's `WrappedTorchNorm` builds
  `torch.nn.RMSNorm` without `params_dtype` and this recipe does not wrap the model in
  `Float16Module`. TE's norms follow `params_dtype`.
- Adam's per-parameter `step` scalars are not counted (the report's safety margin covers them).
- FP8 (TE, delayed scaling) is modelled as: linear-layer inputs saved in 1 byte instead of 2, plus
  an fp8 copy and transpose of every linear weight (2 bytes per element) while the model runs.
"""

from __future__ import annotations

import dataclasses
import math

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.models.hf_config import ModelArch

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of this rank's GPTModel shard, named as Megatron's local spec names it."""

    name: str
    """Megatron parameter name (local spec; TE folds the norms into linear_qkv / linear_fc1)."""
    shape: tuple[int, ...]
    """This rank's shard."""
    dtype: str
    """'bfloat16', 'float16' or 'float32'."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def stage_params(
    arch: ModelArch,
    *,
    tp: int,
    pp: int,
    pp_rank: int,
    params_dtype: str = "bfloat16",
    spec: str = "te",
    ep: int = 1,
    etp: int = 1,
) -> list[Param]:
    """This rank's parameters in `GPTModel.named_parameters()` order (local spec names).

    Column-parallel weights split their output rows over TP, row-parallel ones their input
    columns; norms are replicated. Layers split evenly over PP; the embedding lives on the first
    stage, the final norm and LM head on the last. With tied embeddings and PP > 1 the last stage
    holds Megatron's own copy of the embedding as `output_layer.weight`.
    MoE: the router is replicated; this rank holds E/ep experts (SequentialMLP), each split over
    ETP like a dense MLP over TP (`is_expert` tells them apart).
    """
    h, d, f, v = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size, arch.vocab_size
    nq, g = arch.num_attention_heads, arch.num_query_groups
    norm = params_dtype if spec == "te" else "float32"
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: list[Param] = []

    def add(name: str, shape: tuple[int, ...], dtype: str = params_dtype) -> None:
        out.append(Param(name, shape, dtype))

    if first:
        add("embedding.word_embeddings.weight", (v // tp, h))
    qkv_rows = (nq + 2 * g) * d // tp
    for i in range(arch.num_layers // pp):
        pre = f"decoder.layers.{i}."
        add(pre + "input_layernorm.weight", (h,), norm)
        add(pre + "self_attention.linear_proj.weight", (h, nq * d // tp))
        add(pre + "self_attention.linear_qkv.weight", (qkv_rows, h))
        if arch.qkv_bias:
            add(pre + "self_attention.linear_qkv.bias", (qkv_rows,))
        if arch.qk_layernorm:
            add(pre + "self_attention.q_layernorm.weight", (d,), norm)
            add(pre + "self_attention.k_layernorm.weight", (d,), norm)
        # The MoE layer's norm is its own module on both specs, so it is in the spec's norm dtype.
        add(pre + "pre_mlp_layernorm.weight", (h,), norm)
        if arch.is_moe:
            fe = arch.moe_ffn_hidden_size
            add(pre + "mlp.router.weight", (arch.num_experts, h))
            for e in range(arch.num_experts // ep):
                add(pre + f"mlp.experts.local_experts.{e}.linear_fc1.weight", (2 * fe // etp, h))
                add(pre + f"mlp.experts.local_experts.{e}.linear_fc2.weight", (h, fe // etp))
            continue
        add(pre + "mlp.linear_fc1.weight", (2 * f // tp, h))
        add(pre + "mlp.linear_fc2.weight", (h, f // tp))
    if last:
        add("decoder.final_layernorm.weight", (h,), norm)
        if not arch.tie_word_embeddings or pp > 1:
            add("output_layer.weight", (v // tp, h))
    return out


def is_expert(p: Param) -> bool:
    """A routed expert's weight: Megatron DDP keeps those in their own buffers, sharded by the
    distributed optimizer over the expert-data-parallel group instead of the data-parallel one."""
    return ".local_experts." in p.name


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Bytes of the actor's training state on one rank."""

    params: int
    """Model params: DDP's contiguous (padded) param buffer with the distributed optimizer, else
    the parameter tensors themselves."""
    grads: int
    """DDP's fp32 grad buffer (grad_reduce_in_fp32), padded like the param buffer."""
    main_params: int
    """fp32 master copies of 16-bit params (this DP rank's shard with the distributed optimizer)."""
    adam: int
    """Adam exp_avg + exp_avg_sq, fp32, for what this rank's optimizer owns."""

    @property
    def optimizer(self) -> int:
        return self.main_params + self.adam


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def ddp_buckets(
    params: list[Param], *, dp: int, distributed_optimizer: bool, tied_pp: bool, bucket_size: int | None = None
) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Megatron DDP's layout of one (param dtype, fp32 grad) buffer: [(start, end, param ranges)].

    Mirrors `_ParamAndGradBuffer.__init__` (megatron/core/distributed/param_and_grad_buffer.py,
    0.16.1): params are laid out in reverse order; with the distributed optimizer each param
    starts on a 64-element boundary, each bucket ends on a multiple of lcm(dp, 128), and the
    shared embedding of tied PP > 1 models sits in a bucket of its own. `bucket_size` is None
    because models/build.py turns overlap_grad_reduce off.
    """
    buckets: list[tuple[int, int, list[tuple[int, int]]]] = []
    ranges: list[tuple[int, int]] = []
    bucket_start = pos = 0
    pad = distributed_optimizer

    def close(end: int) -> int:
        nonlocal bucket_start, ranges
        padded = _ceil_to(end, math.lcm(dp, 128)) if pad else end
        buckets.append((bucket_start, padded, ranges))
        bucket_start, ranges = padded, []
        return padded

    for p in reversed(params):
        pos = _ceil_to(pos, 64) if pad else pos
        shared = pad and tied_pp and p.name in ("embedding.word_embeddings.weight", "output_layer.weight")
        if shared and ranges:
            pos = close(pos)
        ranges.append((pos, pos + p.numel))
        pos += p.numel
        if shared or (bucket_size is not None and pos - bucket_start >= bucket_size):
            pos = close(pos)
    if ranges:
        close(pos)
    return buckets


def train_state(
    params: list[Param],
    *,
    dp: int,
    dp_rank: int | None = None,
    distributed_optimizer: bool = True,
    tied_pp: bool = False,
    expert_dp: int | None = None,
    expert_dp_rank: int | None = None,
) -> TrainState:
    """`_group_state` of the dense params over `dp`, plus, for an MoE model, that of the routed
    experts over `expert_dp` (world / (etp x ep x pp)): Megatron gives them buffers of their own."""
    dense = [p for p in params if not is_expert(p)]
    experts = [p for p in params if is_expert(p)]
    state = _group_state(dense, dp=dp, dp_rank=dp_rank, distributed_optimizer=distributed_optimizer, tied_pp=tied_pp)
    if not experts:
        return state
    ex = _group_state(
        experts, dp=expert_dp or dp, dp_rank=expert_dp_rank, distributed_optimizer=distributed_optimizer, tied_pp=False
    )
    return TrainState(
        params=state.params + ex.params,
        grads=state.grads + ex.grads,
        main_params=state.main_params + ex.main_params,
        adam=state.adam + ex.adam,
    )


def _group_state(
    params: list[Param],
    *,
    dp: int,
    dp_rank: int | None = None,
    distributed_optimizer: bool = True,
    tied_pp: bool = False,
) -> TrainState:
    """Params, grad buffer and optimizer state of one rank (`dp_rank` None: the largest DP shard).

    Megatron groups params into one buffer per dtype; the distributed optimizer gives each DP rank
    1/dp of every bucket (`DistributedOptimizer._build_model_gbuf_range`) and keeps fp32 main
    params + Adam state only for the real params inside that slice, not for padding. fp32 params
    need no master copy (their shard is a view of the model param).
    """
    by_dtype: dict[str, list[Param]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    best: TrainState | None = None
    for rank in range(dp) if dp_rank is None else [dp_rank]:
        p_bytes = g_bytes = main = adam = 0
        for dtype, group in by_dtype.items():
            buckets = ddp_buckets(group, dp=dp, distributed_optimizer=distributed_optimizer, tied_pp=tied_pp)
            numel = buckets[-1][1]
            g_bytes += 4 * numel
            if distributed_optimizer:
                p_bytes += DTYPE_BYTES[dtype] * numel
                owned = 0
                for start, end, ranges in buckets:
                    shard = (end - start) // dp
                    lo, hi = start + rank * shard, start + (rank + 1) * shard
                    owned += sum(max(0, min(hi, e) - max(lo, s)) for s, e in ranges)
            else:
                owned = sum(p.numel for p in group)
                p_bytes += owned * DTYPE_BYTES[dtype]
            main += 4 * owned if dtype != "float32" else 0
            adam += 8 * owned
        state = TrainState(params=p_bytes, grads=g_bytes, main_params=main, adam=adam)
        if best is None or state.optimizer > best.optimizer:
            best = state
    assert best is not None
    return best


def layer_activation_bytes(
    arch: ModelArch,
    *,
    tokens: int,
    tp: int,
    sequence_parallel: bool,
    spec: str,
    seq_len: int,
    fp8: bool = False,
    etp: int = 1,
) -> tuple[int, int]:
    """(saved for backward, layer input) bytes of one transformer layer for one micro-batch.

    Korthikanti et al. Sec. 4.1 count 34*s*b*h + 5*a*s^2*b bytes per layer for a GPT layer with
    16-bit activations (s*b*h/t * (34 + 5as/h) with TP + SP, s*b*h * (10 + 24/t + 5as/(ht)) with
    TP only). Redone tensor by tensor for this model family: no dropout (p = 0 saves no masks),
    GQA (K, V are g/a of Q), SwiGLU (fc1 output 2f wide, fc2 input f wide), RMSNorm:
      replicated over TP (sharded by SP): the two norm inputs and the two norm outputs (QKV and
        fc1 inputs): 4 x 2*T*h;
      TP-sharded: Q, K, V, attention output (proj input): 2*T*(2*a*d + 2*g*d); flash attention's
        fp32 log-sum-exp 4*T*a; fc1 output 2*T*2f; SwiGLU output (fc2 input) 2*T*f;
      the local spec's unfused attention also keeps softmax probabilities, 2*a*s*T (the paper's
        5as^2b term without dropout: 2 bytes, b*s^2 = T*s for rows of length s); TE uses flash.
    With full recompute (Sec. 4.3) a layer keeps only its input, 2*T*h (/t with SP).
    `tokens` T = sequences x padded length of the micro-batch.

    MoE layer (`arch.is_moe`), instead of the dense MLP's fc1 output and fc2 input: the router
    (its input is the pre-MLP norm output counted above) keeps its logits [T', E] in 2 bytes and
    the fp32 softmax over all experts the aux loss differentiates, 6*T'*E, where T' = T/t with SP
    (the tokens of this rank's sequence shard; Megatron's MoE layer refuses TP > 1 without SP in
    training), else T. The dispatcher sends each of them to its top-k experts; this rank's experts
    receive R = T' * k * etp rows on average (balanced routing: of the ep x etp ranks' tokens
    routed to E/ep experts, gathered over ETP) and save, like a dense SwiGLU MLP of width fe/etp:
    fc1 input 2*R*h, fc1 output 2*R*2fe/etp, fc2 input 2*R*fe/etp, and the fp32 routing probs
    4*R. The dispatcher's own buffers are transient, not saved (`moe_dispatch_bytes`).
    """
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    a, g = arch.num_attention_heads, arch.num_query_groups
    lin = 1 if fp8 else 2  # bytes per saved linear input
    replicated = 2 * 2 * tokens * h + 2 * lin * tokens * h  # norm inputs; QKV / fc1 (router) inputs
    sharded = (
        2 * tokens * (a * d + 2 * g * d)
        + lin * tokens * a * d  # Q, K, V; proj input
        + 4 * tokens * a  # lse
    )
    if not arch.is_moe:
        sharded += 2 * tokens * 2 * f + lin * tokens * f  # fc1 out; fc2 input
    if spec == "local":
        sharded += 2 * a * seq_len * tokens
    sp = tp if sequence_parallel else 1
    layer_input = 2 * tokens * h // sp
    moe = 0
    if arch.is_moe:
        t_in, fe = tokens // sp, arch.moe_ffn_hidden_size // etp
        rows = t_in * arch.moe_topk * etp
        moe = 6 * t_in * arch.num_experts + lin * rows * h + 2 * rows * 2 * fe + lin * rows * fe + 4 * rows
    return replicated // sp + sharded // tp + moe, layer_input


def moe_dispatch_bytes(arch: ModelArch, *, tokens: int, tp: int, sequence_parallel: bool, etp: int = 1) -> int:
    """The token dispatcher's buffers of one MoE layer, one micro-batch (0 for a dense model).

    The all-to-all dispatcher (GPU) permutes this rank's T' tokens into T'*k rows [T'k, h] (the
    send buffer) and receives R = T'*k*etp rows [R, h] (after the ETP all-gather); the combine
    sends the experts' output [R, h] back into [T'k, h] and un-permutes it. Neither is saved for
    backward (permute and all-to-all keep only indices and split sizes), so at most one send and
    one receive buffer are alive at a time, forward or backward: 2*h*(T'k + R) bytes, one layer at
    a time. Balanced routing; a skewed micro-batch sends more rows to one rank (Megatron's
    dropless dispatcher has no capacity cap), which the margin has to cover.
    """
    if not arch.is_moe:
        return 0
    t_in = tokens // (tp if sequence_parallel else 1)
    sent = t_in * arch.moe_topk
    return 2 * arch.hidden_size * (sent + sent * etp)


@dataclasses.dataclass(frozen=True)
class Activations:
    """Training activations on one pipeline stage (bytes), both recompute settings."""

    per_layer: int
    """Saved tensors of one layer, one micro-batch."""
    in_flight: int
    """Micro-batches whose activations this stage holds at once under 1F1B."""
    no_recompute: int
    """Training peak without recompute."""
    full_recompute: int
    """Training peak with full recompute (model.recompute_activations)."""
    forward_only: int
    """Transient working set of a no-grad forward (one layer at a time)."""
    dispatch: int = 0
    """MoE: the token dispatcher's send and receive buffers of one layer (in each total above)."""


def stage_activations(arch: ModelArch, cfg: TrainConfig, *, pp_rank: int, dp: int) -> Activations:
    """1F1B (Narayanan et al. 2021; Korthikanti Sec. 4.2.3): stage i keeps min(pp - i, #micro-batches)
    micro-batches in flight, so the first stage holds pp x (L/pp) layers' worth: the whole model's."""
    tp, pp, sp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel
    tokens = tokens_per_micro_batch(cfg)
    per_layer, layer_in = layer_activation_bytes(
        arch,
        tokens=tokens,
        tp=tp,
        sequence_parallel=sp,
        spec=plan_spec(cfg),
        seq_len=cfg.model.max_seq_len,
        fp8=cfg.model.fp8 is not None,
        etp=cfg.parallel.etp,
    )
    dispatch = moe_dispatch_bytes(arch, tokens=tokens, tp=tp, sequence_parallel=sp, etp=cfg.parallel.etp)
    seqs = cfg.batch.update_prompts * cfg.algo.group_size // dp  # one optimizer step: a mini-batch
    if cfg.batch.max_tokens_per_micro_batch:  # worst case: every row padded to max_seq_len
        n_mb = math.ceil(seqs / max(1, tokens // cfg.model.max_seq_len))
    else:
        n_mb = seqs // cfg.batch.micro_batch_size
    in_flight = max(1, min(pp - pp_rank, n_mb))
    layers = arch.num_layers // pp
    extra = 0
    if pp_rank == pp - 1:  # final norm input (SP-sharded) + its output, the LM head's input
        extra = 2 * tokens * arch.hidden_size // (tp if sp else 1) + 2 * tokens * arch.hidden_size
    return Activations(
        per_layer=per_layer,
        in_flight=in_flight,
        no_recompute=in_flight * layers * per_layer + extra + dispatch,
        # Sec. 4.3: inputs of every layer kept, one layer's activations rebuilt at a time.
        full_recompute=in_flight * layers * layer_in + per_layer + extra + dispatch,
        forward_only=per_layer + extra + dispatch,
        dispatch=dispatch,
    )


def tokens_per_micro_batch(cfg: TrainConfig) -> int:
    return cfg.batch.max_tokens_per_micro_batch or cfg.batch.micro_batch_size * cfg.model.max_seq_len


def plan_spec(cfg: TrainConfig) -> str:
    return "local" if cfg.model.spec == "local" else "te"


@dataclasses.dataclass(frozen=True)
class LossSet:
    """The vocab-sized working set of the loss on the last stage (bytes)."""

    fused: int
    """algo.fused_loss, training (with its eagerly computed gradients)."""
    naive: int
    """The plain path, training."""
    fused_forward: int
    """algo.fused_loss, log-probs only (no grad)."""
    naive_forward: int
    """The plain path, log-probs only."""


def loss_working_set(arch: ModelArch, cfg: TrainConfig) -> LossSet:
    """Fused (ops/fused_loss.py docstring): at most ~3 fp32 [chunk, V/TP] temporaries, plus what it
    saves for backward: d_hidden [T, h] and d_W [V/TP, h] in the 16-bit param dtype.
    Naive (models/forward.py): the bf16 logits [T, V/TP], the fp32 exp(z) saved for backward and
    one fp32 [T, V/TP] temporary or gradient at a time (+1 fp32 copy saved with an entropy bonus).
    """
    tokens, tp = tokens_per_micro_batch(cfg), cfg.parallel.tp
    v_local, h = arch.vocab_size // tp, arch.hidden_size
    pbytes = DTYPE_BYTES[cfg.model.params_dtype]
    chunk = min(cfg.algo.loss_chunk_tokens, tokens)
    fused_fwd = 3 * 4 * chunk * v_local
    naive_fwd = (2 + 4 + 4) * tokens * v_local
    entropy = 4 * tokens * v_local if cfg.algo.loss.entropy_coef > 0 else 0
    return LossSet(
        fused=fused_fwd + pbytes * (tokens * h + v_local * h),
        naive=naive_fwd + entropy,
        fused_forward=fused_fwd,
        naive_forward=naive_fwd,
    )


def hf_param_count(arch: ModelArch) -> int:
    """Parameters of the HF checkpoint (lm_head counted once more when untied)."""
    return sum(p.numel for p in stage_params(arch, tp=1, pp=1, pp_rank=0))


def vllm_weight_bytes(arch: ModelArch, rollout_tp: int) -> int:
    """One vLLM rank's weights in the checkpoint's 16-bit dtype, split as vLLM splits them over
    rollout.tp: embedding and LM head by vocabulary, attention by heads, a dense MLP or each routed
    expert by its width (vLLM's expert parallelism, `enable_expert_parallel`, gives each rank
    E/tp whole experts instead: the same bytes); replicated: the norms and the MoE router (its
    `gate` is a replicated linear). With rollout.tp above the KV heads, vLLM replicates each KV head
    over tp / KV-heads ranks (`QKVParallelLinear`), so a rank holds one K and one V head.
    """
    h, d, v, tp = arch.hidden_size, arch.head_dim, arch.vocab_size, rollout_tp
    nq, g = arch.num_attention_heads, arch.num_query_groups
    kv_heads = max(1, g // tp)  # per rank
    n = v * h // tp * (1 if arch.tie_word_embeddings else 2) + h  # embedding (+ LM head), final norm
    layer = nq * d * h // tp + 2 * kv_heads * d * h + h * nq * d // tp  # q; k, v; o
    if arch.qkv_bias:
        layer += nq * d // tp + 2 * kv_heads * d
    if arch.qk_layernorm:
        layer += 2 * d
    layer += 2 * h  # input and post-attention norms
    if arch.is_moe:
        layer += arch.num_experts * h + arch.num_experts * 3 * arch.moe_ffn_hidden_size * h // tp
    else:
        layer += 3 * arch.ffn_hidden_size * h // tp
    return 2 * (n + arch.num_layers * layer)


def kv_bytes_per_token(arch: ModelArch, rollout_tp: int) -> int:
    """K and V of every layer for one token on one vLLM rank (bf16 cache; KV heads split over TP,
    one per rank when rollout.tp exceeds them: vLLM replicates them)."""
    return 2 * 2 * arch.num_layers * max(1, arch.num_query_groups // rollout_tp) * arch.head_dim
