#!/usr/bin/env bash
# README command 1: set up (idempotent) and run the main job - the default federated scenario
# through `flwr run .` (simulation), checked for success. Extra arguments go to `serforget simulate`
# (e.g. --fresh, --run-config "num-rounds=5").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/serforget" simulate "$@"
