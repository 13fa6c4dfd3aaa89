"""The memory planner: exact against built Megatron objects, exact against meta-device GPTModels of
the Qwen2.5 7B/32B/72B shapes, formulas against hand-worked numbers, and every shipped preset fits."""

import json
from pathlib import Path

import pytest

from agpo_megatron.cli import main as agpo
from agpo_megatron.config.yaml_io import ConfigError
from agpo_megatron.models.hf_config import arch_from_hf_dict, read_arch
from agpo_megatron.models.tiny import tiny_hf_config
from agpo_megatron.plan.formulas import (
    GiB,
    hf_param_count,
    kv_bytes_per_token,
    layer_activation_bytes,
    moe_dispatch_bytes,
    stage_params,
    train_state,
    vllm_weight_bytes,
)
from agpo_megatron.plan.load import load_train_config
from agpo_megatron.plan.memory import PHASES, plan_memory
from tests.dist import torchrun

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "tests" / "fixtures" / "shapes"
# preset -> (shape fixture, world sizes it is meant for)
PRESETS = {
    "agpo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "agpo_m1_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "grpo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "agrpo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "dapo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "gspo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "drgrpo_qwen7b.yaml": ("qwen2.5-7b", [8]),
    "agpo_qwen32b.yaml": ("qwen2.5-32b", [16, 32]),
    "agpo_qwen72b.yaml": ("qwen2.5-72b", [32, 64]),
    "agpo_qwen3_30b_a3b.yaml": ("qwen3-30b-a3b", [8]),
    "agpo_qwen3_235b_a22b.yaml": ("qwen3-235b-a22b", [64, 128]),
    "agrpo_qwen0.5b_gsm8k.yaml": ("qwen2.5-0.5b", [2]),
    "agrpo_qwen1.5b_gsm8k.yaml": ("qwen2.5-1.5b", [2]),
}


def _write_config(path: Path, model_type: str, **kw) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(tiny_hf_config(model_type, **kw).to_dict()))
    return path


def _planned(params) -> list:
    return [[p.name, list(p.shape), p.dtype] for p in params]


@pytest.mark.slow
def test_planned_bytes_equal_built_megatron_ddp_and_optimizer(tmp_path):
    """Params, DDP grad buffer, fp32 main params and Adam state of real models on 2 gloo ranks.

    Odd widths (hidden 48, vocab 130, ffn 100) make the distributed optimizer's 64-element param
    alignment and lcm(dp, 128) bucket padding visible; the cases cover DP sharding, the shared
    embedding bucket of tied PP=2, TP=2 with qk-norm, fp32 params and the non-distributed optimizer.
    """
    kw = dict(hidden_size=48, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=130, intermediate_size=100)
    models = {
        "untied": _write_config(tmp_path / "untied", "qwen2", **kw),
        "tied": _write_config(tmp_path / "tied", "qwen2", tie=True, **kw),
        "qwen3": _write_config(tmp_path / "qwen3", "qwen3", head_dim=40, **{**kw, "num_kv_heads": 2}),
        # 6 experts of width 40: the experts' own DDP buffer, sharded over expert-DP (2 at EP=1, 1 at EP=2).
        "moe": _write_config(tmp_path / "moe", "qwen3_moe", head_dim=40, num_experts=6, moe_intermediate_size=40, **kw),
    }
    torchrun("plan_measure.py", tmp_path, *(f"{k}={v}" for k, v in models.items()))
    checked = 0
    for rank in (0, 1):
        for case, m in json.loads((tmp_path / f"measured_rank{rank}.json").read_text()).items():
            arch = read_arch(models[case.split("_")[0]])
            lay = m["layout"]
            params = stage_params(
                arch,
                tp=lay["tp"],
                pp=lay["pp"],
                pp_rank=lay["pp_rank"],
                params_dtype="bfloat16" if "bf16" in case else "float32",
                spec="local",
                ep=lay.get("ep", 1),
            )
            assert _planned(params) == m["params"], case
            st = train_state(
                params,
                dp=lay["dp"],
                dp_rank=lay["dp_rank"],
                distributed_optimizer="distopt" in case,
                tied_pp=arch.tie_word_embeddings and lay["pp"] > 1,
                expert_dp=lay.get("expert_dp"),
                expert_dp_rank=lay.get("expert_dp_rank"),
            )
            measured = (m["param_bytes"], m["grad_bytes"], m["main_param_bytes"], m["adam_bytes"])
            assert (st.params, st.grads, st.main_params, st.adam) == measured, (rank, case)
            assert m["adam_bytes"] > 0
            checked += 1
    assert checked == 16
    # The padding is real: with the distributed optimizer the buffer is larger than the params.
    m = json.loads((tmp_path / "measured_rank0.json").read_text())["untied_bf16_dp2_distopt"]
    unpadded = sum(p.nbytes for p in stage_params(read_arch(models["untied"]), tp=1, pp=1, pp_rank=0, spec="local"))
    assert m["param_bytes"] > unpadded


@pytest.mark.slow
def test_meta_device_gptmodel_of_qwen25_shapes_matches_planned_params(tmp_path):
    """One rank's real GPTModel shard (7B at TP=2, 32B at TP=8, 72B at TP=8 x PP=4, first and last
    stage) built on `meta`: every name, shape and dtype, hence the bytes, equal the planner's."""
    layouts = {"qwen2.5-7b": (2, 1), "qwen2.5-32b": (8, 1), "qwen2.5-72b": (8, 4)}
    for preset, (shape, _) in PRESETS.items():  # the presets' own layouts are the ones checked
        if preset.startswith("agpo_qwen") and not shape.startswith("qwen3-"):  # MoE: the test below
            cfg = load_train_config(ROOT / "examples" / preset, [f"model.hf_path={SHAPES / shape}"])
            assert layouts[shape] == (cfg.parallel.tp, cfg.parallel.pp), preset
    out = tmp_path / "meta.json"
    torchrun("plan_meta.py", out, *(f"{SHAPES / s}:{tp}:{pp}" for s, (tp, pp) in layouts.items()), nproc=1)
    built = json.loads(out.read_text())
    assert len(built) == 4
    for key, params in built.items():
        hf_dir, tp, pp, pp_rank = key.rsplit(":", 3)
        planned = stage_params(read_arch(hf_dir), tp=int(tp), pp=int(pp), pp_rank=int(pp_rank), spec="local")
        assert _planned(planned) == params, key
        nbytes = sum(p.nbytes for p in planned)
        assert nbytes == sum(2 * _numel(s) if d == "bfloat16" else 4 * _numel(s) for _, s, d in params)
    # 72B at TP=8 x PP=4: 20 layers per stage; the embedding only first, the LM head only last.
    names = {k.rsplit(":", 1)[1]: {n for n, _, _ in v} for k, v in built.items() if "72b" in k}
    assert "embedding.word_embeddings.weight" in names["0"] and "output_layer.weight" not in names["0"]
    assert "output_layer.weight" in names["3"] and "embedding.word_embeddings.weight" not in names["3"]


@pytest.mark.slow
def test_meta_device_qwen3_30b_a3b_expert_shards_match_planned_params(tmp_path):
    """Qwen3-30B-A3B at TP=2 x PP=2 x EP=4 (the first and last stage of EP rank 0) built on `meta`:
    32 of the 128 experts per layer, the replicated router, every name, shape and dtype as planned;
    the same at ETP=2 and at the two MoE presets' layouts; and the planner's counts by hand."""
    shape = SHAPES / "qwen3-30b-a3b"
    out = tmp_path / "meta.json"
    # Also ETP=2 at TP=2 x PP=4 x EP=8 (12 layers of 16 experts a stage: each expert half as wide),
    # and the MoE presets' own layouts (30B: TP=4 x EP=8; 235B: TP=4 x PP=2 x EP=32).
    presets = {}
    for preset, (fixture, _) in PRESETS.items():
        if fixture.startswith("qwen3-"):
            p = load_train_config(ROOT / "examples" / preset, [f"model.hf_path={SHAPES / fixture}"]).parallel
            presets[preset] = f"{SHAPES / fixture}:{p.tp}:{p.pp}:{p.ep}:{p.etp}"
    assert sorted(presets.values()) == [f"{SHAPES / 'qwen3-235b-a22b'}:4:2:32:1", f"{shape}:4:1:8:1"], presets
    layouts = [f"{shape}:2:2:4", f"{shape}:2:4:8:2", *presets.values()]
    torchrun("plan_meta.py", out, *layouts, nproc=1, timeout=240)
    built = json.loads(out.read_text())
    assert len(built) == 2 + 2 + 1 + 2
    for key, params in built.items():
        hf_dir, *sizes, pp_rank = key.split(":")  # HF_DIR:TP:PP:EP[:ETP]:PP_RANK
        tp, pp, ep, etp = [*map(int, sizes), 1][:4]
        planned = stage_params(read_arch(hf_dir), tp=tp, pp=pp, pp_rank=int(pp_rank), spec="local", ep=ep, etp=etp)
        assert _planned(planned) == params, key
    arch = read_arch(shape)
    etp_shapes = {n: s for n, s, _ in built[f"{shape}:2:4:8:2:0"]}
    assert etp_shapes["decoder.layers.0.mlp.experts.local_experts.15.linear_fc1.weight"] == [768, 2048]  # 2 x 768 / 2
    assert "decoder.layers.0.mlp.experts.local_experts.16.linear_fc1.weight" not in etp_shapes
    experts = [n for n, _, _ in built[f"{shape}:2:2:4:0"] if n.startswith("decoder.layers.0.mlp.experts.")]
    assert len(experts) == 2 * 32  # fc1 + fc2 of 128 / 4 experts
    # 48 layers x (attention 18,874,368 + q/k norms 256 + norms 4,096 + router 262,144 + 128 experts
    # x 3 x 768 x 2048) + embedding and LM head 2 x 151,936 x 2048 + final norm 2048: 30.53B.
    assert hf_param_count(arch) == 30_532_122_624
    full = stage_params(arch, tp=1, pp=1, pp_rank=0, ep=1)
    per_rank = stage_params(arch, tp=1, pp=1, pp_rank=0, ep=8)
    dropped = sum(p.numel for p in full) - sum(p.numel for p in per_rank)
    assert dropped == 48 * (128 - 16) * 3 * 768 * 2048  # EP=8 keeps 16 experts per layer


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_public_parameter_counts():
    # Qwen2.5-32B: 32,763,876,352 parameters (embedding and untied LM head included).
    arch = read_arch(SHAPES / "qwen2.5-32b")
    assert sum(p.numel for p in stage_params(arch, tp=1, pp=1, pp_rank=0)) == 32_763_876_352
    # vLLM at TP=4 holds a quarter of everything but the (replicated) norms, in bf16.
    norms = (2 * arch.num_layers + 1) * arch.hidden_size
    assert vllm_weight_bytes(arch, 4) == 2 * ((32_763_876_352 - norms) // 4 + norms)


def test_activation_formula_by_hand():
    # hidden 64, 4 heads x 16, 2 KV heads, ffn 128; T = 2 x 32 tokens; TP 2.
    arch = arch_from_hf_dict(
        tiny_hf_config("qwen2", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128).to_dict()
    )
    T, h, f = 64, 64, 128
    replicated = 4 * 2 * T * h  # norm inputs + QKV / fc1 inputs
    sharded = 2 * T * (64 + 2 * 32) + 2 * T * 64 + 4 * T * 4 + 2 * T * 2 * f + 2 * T * f
    got = layer_activation_bytes(arch, tokens=T, tp=2, sequence_parallel=False, spec="te", seq_len=32)
    assert got == (replicated + sharded // 2, 2 * T * h)
    sp = layer_activation_bytes(arch, tokens=T, tp=2, sequence_parallel=True, spec="te", seq_len=32)
    assert sp == (replicated // 2 + sharded // 2, T * h)
    # The local spec's unfused softmax keeps a x s^2 x b probabilities in 2 bytes (Korthikanti's 5as^2b, no dropout).
    local = layer_activation_bytes(arch, tokens=T, tp=2, sequence_parallel=False, spec="local", seq_len=32)
    assert local[0] - got[0] == 2 * 4 * 32 * T // 2


def test_moe_activation_and_dispatcher_formulas_by_hand():
    """The routed experts' activations replace the dense MLP's (issue 23): hidden 64, 4 heads x 16,
    2 KV heads, 6 experts of width 40, top-2; T = 64 tokens, TP 2 with SP (Megatron's MoE needs SP
    at TP > 1), so each rank routes T' = 32 tokens."""
    arch = arch_from_hf_dict(
        tiny_hf_config(
            "qwen3_moe", hidden_size=64, num_heads=4, num_kv_heads=2, num_experts=6, moe_intermediate_size=40
        ).to_dict()
    )
    T, h = 64, 64
    replicated = 4 * 2 * T * h // 2  # norm inputs, QKV input, router input: SP-sharded
    attention = (2 * T * (64 + 2 * 32) + 2 * T * 64 + 4 * T * 4) // 2  # Q, K, V; proj input; lse
    router = 6 * 32 * 6  # bf16 logits + fp32 softmax over the 6 experts, per routed token
    # etp 1: the experts receive 32 x 2 = 64 rows: fc1 input, fc1 output (2 x 40), fc2 input (40), fp32 probs.
    experts = 2 * 64 * 64 + 2 * 64 * 80 + 2 * 64 * 40 + 4 * 64
    got = layer_activation_bytes(arch, tokens=T, tp=2, sequence_parallel=True, spec="te", seq_len=32)
    assert got == (replicated + attention + router + experts, 2 * T * h // 2) == (54144, 4096)
    # etp 2: each expert half as wide, twice the rows (the ETP peers' tokens are gathered).
    experts2 = 2 * 128 * 64 + 2 * 128 * 40 + 2 * 128 * 20 + 4 * 128
    got2 = layer_activation_bytes(arch, tokens=T, tp=2, sequence_parallel=True, spec="te", seq_len=32, etp=2)
    assert got2[0] == replicated + attention + router + experts2 == 62592
    # Dispatcher: the send buffer [T'k, h] and the receive buffer [T'k etp, h] in bf16.
    assert moe_dispatch_bytes(arch, tokens=T, tp=2, sequence_parallel=True) == 2 * h * (64 + 64) == 16384
    assert moe_dispatch_bytes(arch, tokens=T, tp=2, sequence_parallel=True, etp=2) == 2 * h * (64 + 128)
    dense = arch_from_hf_dict(tiny_hf_config("qwen3", hidden_size=64, num_heads=4, num_kv_heads=2).to_dict())
    assert moe_dispatch_bytes(dense, tokens=T, tp=2, sequence_parallel=True) == 0


def test_moe_plan_counts_experts_not_the_dense_stand_in():
    """Qwen3-30B-A3B at TP=4 (SP) x EP=8: the per-layer activations are the routed experts' (top-8 x
    768 wide), the dispatcher's buffers are in every Megatron-forward phase, once."""
    arch = read_arch(SHAPES / "qwen3-30b-a3b")
    over = [f"model.hf_path={SHAPES / 'qwen3-30b-a3b'}", "parallel.tp=4", "parallel.sequence_parallel=true"]
    cfg = load_train_config(ROOT / "examples" / "gspo_qwen7b.yaml", over + ["parallel.ep=8", "batch.packing=false"])
    plan = plan_memory(cfg, 8)
    act = plan.stages[0].activations
    T = 16384  # batch.max_tokens_per_micro_batch
    t_in, rows = T // 4, T // 4 * 8
    assert act.dispatch == 2 * 2048 * (rows + rows)
    per_layer, _ = layer_activation_bytes(arch, tokens=T, tp=4, sequence_parallel=True, spec="te", seq_len=4096)
    experts = 2 * rows * 2048 + 2 * rows * 2 * 768 + 2 * rows * 768 + 4 * rows
    assert per_layer == (4 * 2 * T * 2048) // 4 + (2 * T * (4096 + 2 * 512) + 2 * T * 4096 + 4 * T * 32) // 4 + (
        6 * t_in * 128 + experts
    )
    assert act.forward_only == per_layer + act.dispatch + 2 * T * 2048 // 4 + 2 * T * 2048  # + the LM head's input
    assert act.full_recompute == 48 * 2 * T * 2048 // 4 + act.forward_only


def test_moe_layout_needs_sequence_parallel_at_tp_and_vllm_tp_may_replicate_kv_heads():
    shape = f"model.hf_path={SHAPES / 'qwen3-30b-a3b'}"
    config = ROOT / "examples" / "gspo_qwen7b.yaml"
    with pytest.raises(ConfigError, match="parallel.tp=2 with an MoE model needs parallel.sequence_parallel=true"):
        load_train_config(config, [shape, "batch.packing=false"])
    # 4 KV heads: vLLM TP=8 replicates each over 2 ranks; TP=3 neither divides nor is a multiple.
    ok = load_train_config(config, [shape, "parallel.sequence_parallel=true", "rollout.tp=8"])
    assert ok.rollout.tp == 8
    with pytest.raises(ConfigError, match="rollout.tp=3 must divide the heads"):
        load_train_config(config, [shape, "parallel.sequence_parallel=true", "rollout.tp=3"])


def test_vllm_moe_weights_by_hand():
    """vLLM's Qwen3-30B-A3B shard: experts split over its TP (or whole experts over its EP: the
    same bytes), router and norms replicated, one K and one V head per rank past 4 KV heads."""
    arch = read_arch(SHAPES / "qwen3-30b-a3b")
    h, v = 2048, 151936
    layer_tp8 = (
        32 * 128 * h // 8  # q_proj
        + 2 * 1 * 128 * h  # k_proj, v_proj: 4 KV heads replicated over 8 ranks
        + h * 32 * 128 // 8  # o_proj
        + 2 * 128  # q/k norms
        + 2 * h  # layer norms
        + 128 * h  # router (replicated)
        + 128 * 3 * 768 * h // 8  # experts
    )
    assert layer_tp8 == 78_385_408
    assert vllm_weight_bytes(arch, 8) == 2 * (2 * v * h // 8 + h + 48 * layer_tp8) == 7_680_585_728
    attention_tp2 = 32 * 128 * h // 2 + 2 * 2 * 128 * h + h * 32 * 128 // 2 + 2 * 128 + 2 * h  # 2 KV heads a rank
    layer_tp2 = attention_tp2 + 128 * h + 128 * 3 * 768 * h // 2
    assert vllm_weight_bytes(arch, 2) == 2 * (2 * v * h // 2 + h + 48 * layer_tp2)
    assert kv_bytes_per_token(arch, 8) == kv_bytes_per_token(arch, 4) == 2 * 2 * 48 * 1 * 128
    assert kv_bytes_per_token(arch, 2) == 2 * 2 * 48 * 2 * 128


def test_sync_advice_offers_vllm_tp_past_the_kv_heads(capsys):
    """Qwen3-235B-A22B at vLLM TP=8 (55 GiB of weights a rank) does not fit its sync on 8 nodes; TP=16
    (past the 4 KV heads, which vLLM replicates) is the advice, with what it frees."""
    shape = f"model.hf_path={SHAPES / 'qwen3-235b-a22b'}"
    config = str(ROOT / "examples" / "agpo_qwen3_235b_a22b.yaml")
    tp8 = ["rollout.tp=8", "rollout.gpu_memory_utilization=0.85"]
    assert agpo(["plan", "--config", config, "--world-size", "64", shape, *tp8]) == 0
    out = capsys.readouterr().out
    arch = read_arch(SHAPES / "qwen3-235b-a22b")
    freed = (vllm_weight_bytes(arch, 8) - vllm_weight_bytes(arch, 16)) / GiB
    assert "DOES NOT FIT: sync on pp stage 0" in out and f"rollout.tp=16 (frees {freed:.1f} GiB)" in out, out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fit_80gb(preset, capsys):
    shape, worlds = PRESETS[preset]
    over = [f"model.hf_path={SHAPES / shape}"]
    for world in worlds:
        cfg = load_train_config(ROOT / "examples" / preset, over)
        plan = plan_memory(cfg, world, gpu_gb=80)
        assert plan.misfits() == [], (preset, world, plan.misfits())
        for stage in plan.stages:
            for phase in PHASES:
                assert 0 < stage.total(phase) <= plan.usable
        assert agpo(["check", "--config", str(ROOT / "examples" / preset), "--world-size", str(world), *over]) == 0
        out = capsys.readouterr().out
        assert "\nok: world" in "\n" + out and "warning" not in out, out
        assert agpo(["plan", "--config", str(ROOT / "examples" / preset), "--world-size", str(world), *over]) == 0
        assert "DOES NOT FIT" not in capsys.readouterr().out


def test_every_model_preset_is_checked_and_planned():
    """A preset added to examples/ without an entry in PRESETS would skip `agpo check` and `agpo plan`."""
    shipped = {p.name for p in (ROOT / "examples").glob("*_qwen*.yaml")}
    assert shipped == set(PRESETS), shipped ^ set(PRESETS)


def test_check_warns_per_phase_and_plan_says_what_to_change(capsys):
    """The 7B preset as it was (no recompute, vLLM at 0.5) does not fit its update phase on 80 GB."""
    over = [f"model.hf_path={SHAPES / 'qwen2.5-7b'}", "model.recompute_activations=false"]
    config = str(ROOT / "examples" / "agpo_qwen7b.yaml")
    assert agpo(["check", "--config", config, "--world-size", "8", *over]) == 0  # warnings keep exit code 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: memory:")]
    assert len(warnings) == 1 and "update on pp stage 0" in warnings[0], out
    assert "model.recompute_activations=true" in warnings[0]
    assert agpo(["check", "--config", config, "--world-size", "8", *over, "--gpu-mem-gb", "141"]) == 0
    assert "warning" not in capsys.readouterr().out

    assert agpo(["plan", "--config", config, "--world-size", "8", *over]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT: update on pp stage 0" in out and "model.recompute_activations=true (frees" in out
    table = next(line for line in out.splitlines() if line.startswith("fits "))
    assert table.split()[-5:] == ["yes", "yes", "NO", "yes", "yes"]


def test_phases_follow_sleep_and_offload():
    shape = [f"model.hf_path={SHAPES / 'qwen2.5-7b'}"]
    config = ROOT / "examples" / "agpo_qwen7b.yaml"
    base = plan_memory(load_train_config(config, shape), 8).stages[0]
    off = plan_memory(load_train_config(config, shape + ["offload.optimizer=true", "offload.grads=true"]), 8).stages[0]
    # Offload frees the Adam state and grads during rollout, and already during the weight sync:
    # train/colocate.py moves them to host before vLLM's weights wake (the sync does not read them).
    assert base.total("rollout") - off.total("rollout") == base.state.adam + base.state.grads
    assert base.total("sync") - off.total("sync") == base.state.adam + base.state.grads
    assert all(base.total(ph) == off.total(ph) for ph in ("logprobs", "update", "save"))
    # The params leave only after the sync has read them.
    par = plan_memory(load_train_config(config, shape + ["offload.params=true"]), 8).stages[0]
    assert base.total("rollout") - par.total("rollout") == base.state.params + base.state.main_params
    assert par.total("sync") == base.total("sync")
    awake = plan_memory(load_train_config(config, shape + ["rollout.enable_sleep_mode=false"]), 8)
    # Without sleep mode vLLM keeps its whole share (0.4 x 80 GiB) through training.
    assert awake.stages[0].total("update") - base.total("update") == int(0.4 * 80 * GiB)
    # KL on: a reference; on host except while it scores when offloaded.
    kl = plan_memory(load_train_config(config, shape + ["algo.loss.kl_coef=0.01"]), 8).stages[0]
    kl_off = plan_memory(
        load_train_config(config, shape + ["algo.loss.kl_coef=0.01", "offload.reference=true"]), 8
    ).stages[0]
    assert kl.reference == sum(p.nbytes for p in stage_params(read_arch(SHAPES / "qwen2.5-7b"), tp=2, pp=1, pp_rank=0))
    assert kl.total("update") - base.total("update") == kl.reference
    assert kl_off.total("update") == base.total("update") and kl_off.total("logprobs") == kl.total("logprobs")


def test_save_phase_has_vllm_asleep_and_host_line_states_the_pinned_bytes(capsys):
    """Issue 18 items 1 and 2: the planner had no save phase (the save ran with vLLM awake); the host
    line states what offload.* pins per rank, in power-of-two slabs (no rounding to double it)."""
    from agpo_megatron.runtime.pinned import pinned_bytes

    shape = [f"model.hf_path={SHAPES / 'qwen2.5-7b'}", "algo.loss.kl_coef=0.01"]
    config = ROOT / "examples" / "agpo_qwen7b.yaml"
    offl = ["offload.reference=true", "offload.optimizer=true", "offload.params=true", "offload.grads=true"]
    plan = plan_memory(load_train_config(config, shape + offl), 8)
    st = plan.stages[0]
    assert "save" in PHASES
    save = st.phases["save"]
    assert not any(k.startswith("vLLM") for k in save), save  # asleep: the save runs before the hand-over
    assert save["actor grad buffer"] == st.state.grads and save["optimizer Adam m, v"] == st.state.adam
    assert st.total("save") < st.total("update")
    # grads are discarded, not kept on host; params + main params, Adam state and the Reference are
    want = (
        pinned_bytes(st.state.params + st.state.main_params) + pinned_bytes(st.state.adam) + pinned_bytes(st.reference)
    )
    assert st.pinned == want == st.host  # sleep level 2: vLLM keeps nothing on host
    assert want - (st.state.params + st.state.main_params + st.state.adam + st.reference) < 3 * 2 * 2**20
    awake = plan_memory(load_train_config(config, shape + offl + ["rollout.enable_sleep_mode=false"]), 8)
    assert awake.stages[0].phases["save"]["vLLM (no sleep mode)"] > 0
    assert agpo(["plan", "--config", str(config), "--world-size", "8", *shape, *offl]) == 0
    out = capsys.readouterr().out
    assert f"of which {want / GiB:.2f} GiB pinned by offload.*" in out, out


def test_disaggregated_trainer_ranks_hold_no_vllm_and_offload_nothing():
    """Issue 21: the planner accounts for each side: the trainer ranks (here 4 of 8, DP=2) keep their
    whole state through the rollout and hold no vLLM; the rollout ranks hold vLLM only."""
    shape = [f"model.hf_path={SHAPES / 'qwen2.5-7b'}", "offload.optimizer=true", "offload.grads=true"]
    config = ROOT / "examples" / "agpo_qwen7b.yaml"
    split = ["rollout.placement=disaggregated", "rollout.num_ranks=4"]
    colo = plan_memory(load_train_config(config, shape), 8)
    plan = plan_memory(load_train_config(config, shape + split), 8)
    assert (colo.dp, plan.dp) == (4, 2)
    st = plan.stages[0]
    assert not any(k.startswith("vLLM") for ph in PHASES for k in st.phases[ph]), st.phases
    # Nothing offloaded while the rollout ranks generate: the Adam state and grads stay resident.
    assert st.phases["rollout"]["optimizer Adam m, v"] == st.state.adam > 0
    assert st.phases["rollout"]["actor grad buffer"] == st.state.grads > 0
    assert st.pinned == 0 and st.host == 0
    # The distributed optimizer shards over DP: half the data-parallel ranks, twice the Adam state each.
    assert st.state.adam == 2 * colo.stages[0].state.adam
