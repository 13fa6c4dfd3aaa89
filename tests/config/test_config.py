"""Typed config: YAML + dotted overrides, and validation that fails before anything heavy."""

from pathlib import Path

import pytest

from agpo_megatron.config.schema import TrainConfig
from agpo_megatron.config.yaml_io import ConfigError
from agpo_megatron.models.tiny import tiny_hf_config
from agpo_megatron.plan.load import load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    # 4 heads, 2 KV groups, 2 layers: TP=2 and PP=2 legal, TP=4 illegal for KV groups, PP=4 illegal.
    tiny_hf_config("qwen2", num_heads=4, num_kv_heads=2, num_layers=2).save_pretrained(d)
    return d


@pytest.fixture()
def yaml_file(tmp_path, hf_dir):
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"model: {{hf_path: {hf_dir}}}\n"
        "data: {train: {path: x.jsonl, answer_format: gsm8k}}\n"
        "algo: {gamma: 0.1, group_size: 4}\n"
        "batch: {prompts_per_rollout: 8, micro_batch_size: 4}\n"
    )
    return p


def test_yaml_and_dotted_overrides(yaml_file):
    cfg = load_train_config(
        yaml_file,
        ["algo.gamma=0.05", "parallel.tp=2", "algo.loss.eps_high=0.28", "algo.loss.tis_cap=2", "model.fp8=null"],
    )
    assert isinstance(cfg, TrainConfig)
    assert cfg.algo.gamma == 0.05 and cfg.parallel.tp == 2
    assert cfg.algo.loss.eps_high == 0.28 and cfg.algo.loss.tis_cap == 2.0
    assert cfg.algo.group_size == 4 and cfg.data.train.answer_format == "gsm8k"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("parallel.tp=3", "must divide the 4 attention heads"),
        ("parallel.tp=4", "must divide the 2 query groups"),
        ("parallel.pp=4", "must divide the 2 layers"),
        ("parallel.ep=0", "parallel.ep must be >= 1"),
        ("parallel.etp=0", "parallel.etp must be >= 1"),
        ("parallel.etp=2", "parallel.ep=1 / parallel.etp=2 need an MoE model (qwen2 is dense)"),
        ("model.moe_aux_loss_coef=-1", "model.moe_aux_loss_coef must be >= 0"),
        ("algo.routing_replay=r2", "algo.routing_replay=r2 needs an MoE model (qwen2 is dense)"),
        ("algo.routing_replay=r3", "algo.routing_replay=r3 needs an MoE model (qwen2 is dense)"),
        ("algo.routing_replay=r1", "algo.routing_replay: 'r1' is not one of"),
        ("algo.group_size=1", "algo.group_size must be >= 2"),
        ("algo.loss.eps_low=1.5", "eps_low"),
        ("algo.loss.eps_high=-0.1", "eps_high"),
        ("algo.loss.dual_clip_c=0.5", "dual_clip_c"),
        ("algo.gamma=-0.1", "algo.gamma must be >= 0"),
        ("batch.micro_batch_size=3", "micro_batch_size (3) must divide"),
        ("algo.advantage=ppo", "algo.advantage: 'ppo' is not one of"),
        ("algo.gamma=abc", "algo.gamma: expected a number"),
        ("algo.gama=0.1", "algo.gama"),
        ("rollout.temperature=0", "rollout.temperature must be > 0"),
        ("rollout.max_new_tokens=5000", "exceeds model.max_seq_len"),
        ("model.fp8=e4m3", None),  # legal on its own (spec auto); the build refuses on CPU
    ],
)
def test_validation_names_the_field(yaml_file, override, needle):
    if needle is None:
        load_train_config(yaml_file, [override])
        return
    with pytest.raises(ConfigError) as e:
        load_train_config(yaml_file, [override])
    assert needle in str(e.value)
    # The override that set the field is blamed; a check across fields blames the file.
    assert f"override {override!r}: " in str(e.value) or str(yaml_file) in str(e.value)


def test_missing_model_dir_is_reported(yaml_file, tmp_path):
    with pytest.raises(ConfigError, match="model.hf_path: no config.json"):
        load_train_config(yaml_file, [f"model.hf_path={tmp_path / 'nope'}"])


def test_world_size_checks(yaml_file):
    cfg = load_train_config(yaml_file, ["parallel.tp=2"])
    assert cfg.check_world(4) == 2
    with pytest.raises(ConfigError, match="not a multiple of tp x pp"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="must be divisible by data-parallel size"):
        load_train_config(yaml_file, ["batch.prompts_per_rollout=3", "batch.micro_batch_size=1"]).check_world(2)


def test_moe_layout_checks(tmp_path, yaml_file):
    # 6 experts of width 48: ep=2 legal (on a world of 4, not 3), ep=4 not; etp=5 not.
    moe = tmp_path / "moe"
    tiny_hf_config("qwen3_moe", num_heads=4, num_kv_heads=2, num_experts=6, moe_intermediate_size=48).save_pretrained(
        moe
    )
    with pytest.raises(ConfigError, match="parallel.ep=2 needs batch.packing=false"):
        load_train_config(yaml_file, [f"model.hf_path={moe}", "parallel.ep=2"])
    cfg = load_train_config(yaml_file, [f"model.hf_path={moe}", "parallel.ep=2", "batch.packing=false"])
    assert cfg.check_world(4) == 4
    with pytest.raises(ConfigError, match="parallel.ep=2: world size 3 is not a multiple of etp x ep x pp = 2"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="parallel.ep=4 must divide the 6 experts"):
        load_train_config(yaml_file, [f"model.hf_path={moe}", "parallel.ep=4", "batch.packing=false"])
    with pytest.raises(ConfigError, match="parallel.etp=5 must divide the experts' 48 ffn width"):
        load_train_config(yaml_file, [f"model.hf_path={moe}", "parallel.etp=5"])
    assert load_train_config(yaml_file, [f"model.hf_path={moe}", "algo.routing_replay=r2"]).algo.routing_replay == "r2"
    for extra, needle in [
        ("rollout.logprob_mode=rollout", "needs rollout.logprob_mode=recompute"),
        ("model.recompute_activations=true", "needs model.recompute_activations=false"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_train_config(yaml_file, [f"model.hf_path={moe}", "algo.routing_replay=r2", extra])


def test_every_field_has_a_docstring():
    import ast
    import inspect

    from agpo_megatron.config import algo, model, schema

    tree = ast.Module(body=[n for m in (schema, model, algo) for n in ast.parse(inspect.getsource(m)).body])
    assert {"TrainConfig", "ModelConfig", "AlgoConfig"} <= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                    f"{cls.name}.{node.target.id} has no docstring"
                )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_parse(path, hf_dir):
    # Shipped configs point at real models; validate them against the tiny (dense) model's shape instead.
    single = ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1", "parallel.ep=1", "rollout.tp=1"]
    cfg = load_train_config(path, [f"model.hf_path={hf_dir}", *single])
    assert cfg.algo.group_size >= 2


def test_scientific_numbers_parse_in_yaml_and_overrides(yaml_file, tmp_path):
    """Issue 11: the paper's lr is written 1e-6; YAML 1.1 reads that as a string."""
    assert load_train_config(yaml_file, ["optim.lr=1e-6"]).optim.lr == 1e-6
    p = tmp_path / "lr.yaml"
    p.write_text(yaml_file.read_text() + "optim: {lr: 1e-6, min_lr: 5E-8}\nrollout: {top_p: .5}\n")
    cfg = load_train_config(p, ["algo.adaptive_kl_target=2e-3"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.rollout.top_p, cfg.algo.adaptive_kl_target) == (1e-6, 5e-8, 0.5, 2e-3)
    for bad in ("1e", "e-6", "1e-6x", "1.2.3"):
        with pytest.raises(ConfigError, match="optim.lr: expected a number"):
            load_train_config(yaml_file, [f"optim.lr={bad}"])


def test_agpo_reward_bounds_must_match_the_reward(yaml_file):
    """Issue 10: r_min=-1 with a 0/1 reward would give all-wrong groups 0 instead of -1, silently."""
    with pytest.raises(ConfigError, match=r"algo.r_min=-1 / algo.r_max=1 must be the math reward's range \[0, 1\]"):
        load_train_config(yaml_file, ["algo.r_min=-1"])
    assert load_train_config(yaml_file, ["algo.r_min=-1", "algo.advantage=grpo"]).algo.r_min == -1  # unused by GRPO


def test_a_run_with_save_dir_always_saves_its_last_step():
    """Issue 11: save_interval=0 still saves once, at the end (and save_dir's writability is checked at start)."""
    from agpo_megatron.config.schema import CheckpointConfig

    c = CheckpointConfig(save_dir="ckpt", save_interval=0)
    assert [s for s in range(1, 11) if c.due(s, 10)] == [10]
    assert [s for s in range(1, 11) if CheckpointConfig(save_dir="ckpt", save_interval=4).due(s, 10)] == [4, 8, 10]
    assert not any(CheckpointConfig(save_dir=None).due(s, 10) for s in range(1, 11))


def test_tis_needs_recomputed_old_logprobs(yaml_file):
    """Issue 10: with logprob_mode=rollout, old log-probs are the rollout's and the TIS weight is always 1."""
    with pytest.raises(ConfigError, match=r"algo.loss.tis_cap=2.0 needs rollout.logprob_mode=recompute") as e:
        load_train_config(yaml_file, ["algo.loss.tis_cap=2", "rollout.logprob_mode=rollout"])
    assert "rollout.logprob_mode=rollout" in str(e.value)
    cfg = load_train_config(yaml_file, ["algo.loss.tis_cap=2", "rollout.logprob_mode=recompute"])
    assert cfg.algo.loss.tis_cap == 2.0


def test_controller_settings_come_from_the_config(yaml_file):
    """Issue 10: A-GRPO's eps = 0.5 ablation with adaptive clip needs the clip bounds in the config."""
    eps = ["algo.loss.eps_low=0.5", "algo.loss.eps_high=0.5", "algo.adaptive_clip=true", "batch.prompts_per_update=4"]
    with pytest.raises(
        ConfigError,
        match=r"algo.loss.eps_low=0.5 is the adaptive clip's start and must be in "
        r"\[algo.clip_controller.eps_min, eps_max\] = \[0.05, 0.4\]",
    ):
        load_train_config(yaml_file, eps)
    cfg = load_train_config(
        yaml_file,
        [
            *eps,
            "algo.clip_controller.eps_max=0.6",
            "algo.clip_controller.target_kl=0.02",
            "algo.adaptive_kl_target=0.05",
            "algo.kl_controller.horizon=20",
        ],
    )
    clip, kl = cfg.algo.clip_settings(), cfg.algo.kl_settings()
    assert (clip.init_eps_low, clip.init_eps_high, clip.eps_max, clip.target_kl) == (0.5, 0.5, 0.6, 0.02)
    assert (kl.init_beta, kl.target_kl, kl.horizon) == (1e-6, 0.05, 20)  # kl_coef=0 starts at beta_min
    for bad, needle in [
        ("algo.clip_controller.eps_max=1.0", "algo.clip_controller.eps_max must be in [eps_min, 1)"),
        ("algo.clip_controller.eps_min=0", "algo.clip_controller.eps_min must be > 0"),
        ("algo.clip_controller.horizon=0.5", "algo.clip_controller.horizon must be >= 1"),
        ("algo.kl_controller.beta_min=0", "algo.kl_controller.beta_min must be > 0"),
        ("algo.kl_controller.ema_decay=1", "algo.kl_controller.ema_decay must be in [0, 1)"),
        (
            "algo.loss.kl_coef=2",
            "algo.loss.kl_coef=2 is the adaptive beta's start and must be <= algo.kl_controller.beta_max=1",
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            load_train_config(
                yaml_file,
                ["algo.adaptive_clip=true", "algo.adaptive_kl_target=0.01", "batch.prompts_per_update=4", bad],
            )
        assert needle in str(e.value) and f"override {bad!r}: " in str(e.value)
    # off: the settings are not used, so an eps outside the (default) bounds is fine
    assert load_train_config(yaml_file, ["algo.loss.eps_low=0.5"]).algo.clip_settings() is None


def test_drgrpo_warns_unless_its_aggregation_is_used(yaml_file, recwarn):
    """Issues 10, 22: Dr.GRPO is no-std advantages AND the constant normaliser; the advantage alone is not Dr.GRPO."""
    with pytest.warns(UserWarning, match="algo.advantage=drgrpo with algo.loss.agg_mode=token-mean is not Dr.GRPO"):
        load_train_config(yaml_file, ["algo.advantage=drgrpo"])
    # seq-mean-token-sum is off by the factor rollout.max_new_tokens, which optim.clip_grad sees.
    with pytest.warns(UserWarning, match="agg_mode=seq-mean-token-sum is not Dr.GRPO"):
        load_train_config(yaml_file, ["algo.advantage=drgrpo", "algo.loss.agg_mode=seq-mean-token-sum"])
    recwarn.clear()
    load_train_config(yaml_file, ["algo.advantage=drgrpo", "algo.loss.agg_mode=seq-mean-token-sum-norm"])
    load_train_config(yaml_file, ["algo.advantage=grpo"])
    assert not [w for w in recwarn if "drgrpo" in str(w.message)]


def test_old_batch_key_names_its_new_name(yaml_file, tmp_path):
    """Issue 10: batch.prompts_per_step became batch.prompts_per_rollout (+ prompts_per_update)."""
    with pytest.raises(ConfigError) as e:
        load_train_config(yaml_file, ["batch.prompts_per_step=8"])
    assert "batch.prompts_per_step was renamed batch.prompts_per_rollout" in str(e.value)
    assert str(e.value).count("\n") == 0
    old = tmp_path / "old.yaml"
    old.write_text(yaml_file.read_text().replace("prompts_per_rollout", "prompts_per_step"))
    with pytest.raises(ConfigError, match=r"old.yaml: batch.prompts_per_step was renamed batch.prompts_per_rollout"):
        load_train_config(old)


def test_mini_batches_divide_the_rollout_and_the_layout(yaml_file):
    """Issue 10: a rollout of prompts_per_rollout prompts makes rollout / update optimizer steps per epoch."""
    cfg = load_train_config(yaml_file, ["batch.prompts_per_update=2", "algo.ppo_epochs=3", "steps=5"])
    assert (cfg.batch.updates_per_rollout, cfg.optimizer_steps()) == (4, 5 * 4 * 3)
    assert load_train_config(yaml_file).batch.updates_per_rollout == 1  # None: the whole rollout
    for bad, needle in [
        (
            "batch.prompts_per_update=3",
            ("batch.prompts_per_update (3) must be >= 1 and divide batch.prompts_per_rollout (8)"),
        ),
        ("batch.prompts_per_update=16", "batch.prompts_per_update (16) must be"),
        ("batch.prompts_per_update=0", "batch.prompts_per_update (0) must be"),
        (
            "batch.micro_batch_size=3",
            (
                "batch.micro_batch_size (3) must divide the mini-batch of "
                "batch.prompts_per_rollout x algo.group_size = 32 sequences"
            ),
        ),
    ]:
        with pytest.raises(ConfigError) as e:
            load_train_config(yaml_file, [bad])
        assert needle in str(e.value)
    with pytest.raises(
        ConfigError,
        match=r"micro_batch_size \(8\) must divide the mini-batch of "
        r"batch.prompts_per_update x algo.group_size = 4 sequences",
    ):
        load_train_config(yaml_file, ["batch.prompts_per_update=1", "batch.micro_batch_size=8"])
    cfg = load_train_config(yaml_file, ["batch.prompts_per_update=2"])
    assert cfg.check_world(2) == 2
    with pytest.raises(ConfigError, match=r"batch.prompts_per_update \(2\) must be divisible by data-parallel size 4"):
        cfg.check_world(4)
    with pytest.raises(ConfigError, match=r"micro_batch_size \(4\) must divide the 2 sequences of a mini-batch"):
        load_train_config(yaml_file, ["batch.prompts_per_update=4", "algo.group_size=2"]).check_world(4)


def test_adaptive_clip_needs_an_off_policy_update(yaml_file, recwarn):
    """Issue 10: with one update per rollout the ratio is exactly 1, so approx_kl is 0 and eps_t drifts to its cap."""
    with pytest.raises(
        ConfigError,
        match=r"algo.adaptive_clip needs off-policy updates .*batch.prompts_per_update = "
        r"batch.prompts_per_rollout \(8\) and algo.ppo_epochs=1",
    ):
        load_train_config(yaml_file, ["algo.adaptive_clip=true"])
    for ok in (["batch.prompts_per_update=4"], ["algo.ppo_epochs=2"]):
        assert load_train_config(yaml_file, ["algo.adaptive_clip=true", *ok]).algo.clip_settings() is not None
    assert not [w for w in recwarn if "eps_low/eps_high" in str(w.message)]
    with pytest.warns(UserWarning, match=r"algo.loss.eps_low/eps_high \(0.2/0.28\) have no effect"):
        load_train_config(yaml_file, ["algo.loss.eps_high=0.28"])
    recwarn.clear()
    load_train_config(yaml_file, ["algo.loss.eps_high=0.28", "batch.prompts_per_update=4"])
    load_train_config(yaml_file, ["algo.loss.eps_high=0.28", "rollout.logprob_mode=rollout"])  # clips engine mismatch
    assert not [w for w in recwarn if "eps_low/eps_high" in str(w.message)]


def test_drgrpo_norm_tokens_default_to_the_generation_budget(yaml_file):
    over = ["algo.advantage=drgrpo", "algo.loss.agg_mode=seq-mean-token-sum-norm", "rollout.max_new_tokens=48"]
    assert load_train_config(yaml_file, over).algo.loss.norm_tokens == 48
    assert load_train_config(yaml_file, [*over, "algo.loss.norm_tokens=100"]).algo.loss.norm_tokens == 100
    assert load_train_config(yaml_file, []).algo.loss.norm_tokens is None  # other modes do not use it
    with pytest.raises(ConfigError, match="norm_tokens"):
        load_train_config(yaml_file, [*over, "algo.loss.norm_tokens=0"])


def test_dynamic_sampling_with_m1_is_refused_in_one_line_unless_on_purpose(yaml_file):
    with pytest.raises(ConfigError) as e:
        load_train_config(yaml_file, ["algo.advantage=agpo", "algo.dynamic_sampling.enabled=true"])
    msg = str(e.value)
    assert msg.count("\n") == 0 and "m1 would never act" in msg and "allow_with_m1=true" in msg
    on_purpose = [
        "algo.advantage=agpo",
        "algo.dynamic_sampling.enabled=true",
        "algo.dynamic_sampling.allow_with_m1=true",
    ]
    assert load_train_config(yaml_file, on_purpose).algo.dynamic_sampling.enabled
    cfg = load_train_config(yaml_file, ["algo.advantage=grpo", "algo.dynamic_sampling.enabled=true"])
    assert cfg.algo.dynamic_sampling.max_rollout_rounds == 3
    with pytest.raises(ConfigError, match="algo.dynamic_sampling.max_rollout_rounds must be >= 1"):
        load_train_config(yaml_file, ["algo.advantage=grpo", "algo.dynamic_sampling.max_rollout_rounds=0"])


def test_overlong_settings_are_validated(yaml_file):
    with pytest.raises(ConfigError, match=r"algo.overlong.buffer_tokens \(48\) must be below rollout.max_new_tokens"):
        load_train_config(
            yaml_file,
            ["algo.overlong.soft_punishment=true", "algo.overlong.buffer_tokens=48", "rollout.max_new_tokens=48"],
        )
    # Unset: a fifth of the budget, DAPO's proportion (4096 of 20480).
    assert load_train_config(yaml_file, ["rollout.max_new_tokens=48"]).algo.overlong.buffer_tokens == 9
    with pytest.raises(ConfigError, match="algo.overlong.penalty must be >= 0"):
        load_train_config(yaml_file, ["algo.overlong.penalty=-1"])
    with pytest.raises(ConfigError, match="algo.loss.ratio_level"):
        load_train_config(yaml_file, ["algo.loss.ratio_level=seq"])
    cfg = load_train_config(yaml_file, ["algo.advantage=rloo", "algo.loss.ratio_level=sequence"])
    assert (cfg.algo.advantage, cfg.algo.loss.ratio_level) == ("rloo", "sequence")
