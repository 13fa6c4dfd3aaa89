"""The CPU compatibility layer activates only without CUDA, once, and only rewrites inside its scope."""

import subprocess
import sys

import pytest
import torch

from agpo_megatron.runtime import cpu_platform as cpu


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.slow
def test_inactive_when_cuda_present():
    # The only activation condition is torch.cuda.is_available(); pretend a GPU is there.
    print_state = _run(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = torch.cuda.current_device\n"
        "from agpo_megatron.runtime import cpu_platform as cpu\n"
        "print(cpu.activate(), cpu.is_active(), torch.cuda.current_device is orig)"
    )
    assert print_state == "False False True"


@pytest.mark.slow
def test_second_activation_is_a_noop():
    out = _run(
        "import torch\n"
        "from agpo_megatron.runtime import cpu_platform as cpu\n"
        "assert cpu.activate()\n"
        "patched = torch.cuda.current_device, torch.cuda.get_rng_state\n"
        "assert cpu.activate()\n"
        "print(patched == (torch.cuda.current_device, torch.cuda.get_rng_state), torch.cuda.current_device())"
    )
    assert out == "True cpu"


@pytest.mark.slow
def test_scope_rewrites_cuda_factories_and_type_strings_only_inside():
    if torch.cuda.is_available():
        return  # the layer is inert on GPU machines; nothing to rewrite
    with cpu.megatron_scope():
        t = torch.zeros(3, device="cuda")
        assert t.device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.cuda() is t
        assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.zeros(1).type() == "torch.FloatTensor"  # outside the scope: untouched


@pytest.mark.slow
def test_rng_tracker_fork_is_served_by_the_cpu_generator():
    out = _run(
        "import torch\n"
        "from agpo_megatron.runtime import cpu_platform as cpu\n"
        "cpu.activate()\n"
        "from megatron.core.tensor_parallel import random as r\n"
        "tr = r.get_cuda_rng_tracker(); tr.add('x', 7)\n"
        "with tr.fork('x'): a = torch.rand(3)\n"
        "tr.reset(); tr.add('x', 7)\n"
        "with tr.fork('x'): b = torch.rand(3)\n"
        "print(torch.equal(a, b))"
    )
    assert out == "True"


@pytest.mark.slow
def test_current_stream_is_the_cpu_stream():
    # megatron-core 0.19's DDP grad sync waits on torch.cuda.current_stream().
    out = _run(
        "import torch\n"
        "from agpo_megatron.runtime import cpu_platform as cpu\n"
        "if cpu.activate():\n"
        "    s = torch.cuda.current_stream()\n"
        "    s.wait_stream(torch.cuda.current_stream()); s.wait_event(torch.cpu.Event())\n"
        "    print(type(s).__module__, type(s).__name__)\n"
        "else:\n"
        "    print('torch.cpu Stream')  # inert on GPU machines"
    )
    assert out == "torch.cpu Stream"
