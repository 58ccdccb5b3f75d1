#!/usr/bin/env bash
# Issue 12's GPU check (under 5 minutes on a GPU machine): the compact model and a base-size
# wav2vec2 trained a few steps and unlearning 10 utterances, CUDA vs CPU on this machine.
# Writes benchmarks/results/gpu_check.json and .md; on a CPU-only machine the CUDA rows are
# skipped with a note. Options: --tiny (or GPU_CHECK_TINY=1) for a quick self-test, --out PATH.
# PYTHON overrides the interpreter (default: the project's .venv, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
