#!/usr/bin/env bash
# README command 2: set up (idempotent), lint (ruff), then run the whole test suite, slow end-to-end tests
# included. Extra arguments go to pytest (e.g. -m "not slow" for the fast suite).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1
echo "[test] ruff check + ruff format --check"
"$ROOT/.venv/bin/ruff" check --quiet .
"$ROOT/.venv/bin/ruff" format --check --quiet .
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
