#!/usr/bin/env bash
# One-GPU smoke suite of issue 8 (H100/H200, under 8 minutes, no network). See docs/gpu-status.md.
#
#   bash scripts/gpu_smoke.sh                      # on the GPU machine
#   bash scripts/gpu_smoke.sh --out "$OUT"         # keep results.json, summary.txt, logs/ there
#   bash scripts/gpu_smoke.sh --dry-run            # CPU: imports, APIs, arguments (what CI runs)
#   bash scripts/gpu_smoke.sh --cpu-logic          # CPU/gloo: the check code at tiny sizes
#   bash scripts/gpu_smoke.sh --list               # sections and checks; --only/--skip select
#
# Environment:
#   PYTHON     interpreter (default: the repo's .venv/bin/python if present, else python3)
#   MCORE_SRC  a directory holding megatron/ (a source copy of megatron-core) when it is not
#              installed; <repo>/.mcore is tried next
#
# Prints one "SMOKE <check> PASS|FAIL|SKIP key=value ..." line per check, then
# "N passed, N failed, N skipped"; exits 1 if any check failed (2 on a usage error).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$REPO"
exec "$PYTHON" -m tests.gpu.smoke "$@"
