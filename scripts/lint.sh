#!/usr/bin/env bash
# Lint, format and type checks: the pre-commit hooks over the whole tree (.pre-commit-config.yaml:
# ruff check, ruff format, mypy). A file the formatter would change fails the check.
#   bash scripts/lint.sh [VENV]      # VENV defaults to .venv (scripts/setup_cpu.sh builds it)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
export PRE_COMMIT_HOME=${PRE_COMMIT_HOME:-$PWD/.cache/pre-commit}
pre-commit run --all-files --show-diff-on-failure
