#!/usr/bin/env bash
# The CPU test tier at both ends of the supported megatron-core range (pyproject.toml):
#   1. Python 3.11 + megatron-core 0.16.1 (.venv): the whole suite.
#   2. Python 3.12 + the newest megatron-core 0.19.x (.venv312): the whole suite.
# Each tier sets up its venv first (scripts/setup_cpu.sh, idempotent). pytest's exit code 5 (no
# tests collected) counts as a failure: a tier that runs nothing must not pass silently.
#   TIERS="311" bash scripts/test_all.sh      # one tier only (311, 312)
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
    # NOTE: a TP=2 vLLM-CPU engine in a process that ends through os._exit (the trainer's
    # exit_cleanly) leaves its shared-memory files behind, and the next TP=2 engine then fails
    # with "create shm in SHMManager failed. errno: 17". One tier's e2e test would break the next
    # tier's, so each tier starts without them.
    rm -f /dev/shm/*cpushm*
    echo "== tier $name: setup ($venv, $py)"
    if ! VENV=$venv PYTHON=$py bash scripts/setup_cpu.sh; then
        echo "tier $name: setup failed" >&2; return 1
    fi
    echo "== tier $name: setup $((SECONDS - start)) s; $("$venv/bin/python" -c 'import sys, torch, megatron.core as m; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m.__version__}")')"
    start=$SECONDS
    "$venv/bin/python" -m pytest -q
    rc=$?
    echo "== tier $name: pytest exit $rc in $((SECONDS - start)) s"
    if [ "$rc" -eq 5 ]; then echo "tier $name: pytest collected no tests" >&2; return 1; fi
    return "$rc"
}

status=0
for t in ${TIERS:-311 312}; do
    case $t in
        311) tier 3.11 .venv "${PYTHON:-python3}" || status=1 ;;
        312) py=$(python312)
             if [ -z "$py" ]; then echo "tier 3.12: no python3.12 found (PATH or pyenv)" >&2; status=1; continue; fi
             tier 3.12 .venv312 "$py" || status=1 ;;
        *) echo "unknown tier $t (311, 312)" >&2; status=1 ;;
    esac
done
exit "$status"
