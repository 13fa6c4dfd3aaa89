"""VLLMEngine's sleep protocol against a fake `vllm.LLM`: which vLLM calls each method makes on GPU,
and the order it enforces on every platform (sleep -> wake_weights -> update_weights -> wake_kv_cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from agpo_megatron.config.model import ModelConfig
from agpo_megatron.config.schema import RolloutConfig
from agpo_megatron.rollout import vllm_engine
from agpo_megatron.rollout.base import SamplingConfig
from agpo_megatron.rollout.vllm_engine import VLLMEngine


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.multiprocessing_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        FakeLLM.instances.append(self)

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs=None):
        if kwargs is not None:
            list(kwargs["weights_iterator"])
        self.calls.append((method if isinstance(method, str) else method.__name__,))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(("generate",))
        out = types.SimpleNamespace(index=0, token_ids=[3], logprobs=None, text="", finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture
def engine_on(monkeypatch):
    """engine_on(gpu: bool, **rollout overrides) -> (engine, fake LLM)."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=dict))
    monkeypatch.setattr(vllm_engine.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(vllm_engine.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(vllm_engine.dist, "get_world_size", lambda: 1)

    def make(gpu: bool, **rollout):
        monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: gpu)
        engine = VLLMEngine.from_config(
            RolloutConfig(**rollout), ModelConfig(hf_path="/m", params_dtype="float32"), seed=0
        )
        return engine, FakeLLM.instances[-1]

    return make


def _generate(engine):
    return engine.generate([[1, 2]], 1, SamplingConfig(max_new_tokens=2))


def test_gpu_level2_calls_vllm_in_the_rl_order(engine_on):
    engine, llm = engine_on(gpu=True)
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["enable_sleep_mode"] is True
    engine.sleep()
    engine.sleep()  # idempotent: vLLM warns on a second sleep
    engine.wake_weights()
    engine.update_weights(iter([("w", None)]))
    engine.wake_kv_cache()
    _generate(engine)
    # generate() clears the prefix cache first: a step never reuses K/V cached by an earlier call.
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("reload_weights",),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("generate",),
    ]


def test_level1_keeps_the_weights(engine_on):
    engine, llm = engine_on(gpu=True, sleep_level=1)
    engine.sleep()
    engine.wake_weights()
    engine.wake_kv_cache()  # allowed without a sync: level 1 restored the weights
    _generate(engine)
    assert llm.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("generate",),
    ]


@pytest.mark.parametrize("gpu", [True, False])
def test_wrong_order_raises_on_every_platform(engine_on, gpu):
    engine, llm = engine_on(gpu=gpu)
    engine.sleep()
    with pytest.raises(RuntimeError, match="generate while"):
        _generate(engine)
    with pytest.raises(RuntimeError, match="update_weights while the weights sleep"):
        engine.update_weights(iter([]))
    with pytest.raises(RuntimeError, match="wake_kv_cache before the weights"):
        engine.wake_kv_cache()
    engine.wake_weights()
    with pytest.raises(RuntimeError, match="wake_kv_cache before the weights"):
        engine.wake_kv_cache()  # level 2: the weights are garbage until synced
    with pytest.raises(RuntimeError, match="generate while"):
        _generate(engine)
    engine.update_weights(iter([]))
    engine.wake_kv_cache()
    _generate(engine)
    if not gpu:  # vLLM refuses sleep mode on CPU: nothing but generate and the sync reach it
        # (after a reload, the CPU MoE experts are packed again: rollout/vllm_engine.py)
        assert llm.calls == [
            ("reload_weights",),
            ("repack_cpu_moe_experts",),
            ("reset_prefix_cache",),
            ("reset_prefix_cache",),
            ("generate",),
        ]
        assert "enable_sleep_mode" not in llm.kwargs


def test_sleep_level_is_validated(engine_on):
    with pytest.raises(ValueError, match="sleep_level"):
        engine_on(gpu=False, sleep_level=3)


def test_in_process_engine_cores_are_set_at_construction_not_import(engine_on, monkeypatch):
    # external_launcher needs VLLM_ENABLE_V1_MULTIPROCESSING=0 by the time vLLM builds its engine
    # (vllm.envs reads it lazily); a 1 left in the environment is overridden.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    _, llm = engine_on(gpu=False)
    assert llm.multiprocessing_env == "0"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, agpo_megatron.rollout.vllm_engine; print(os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "None"  # importing the module has no side effect
