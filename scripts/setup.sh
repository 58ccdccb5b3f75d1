#!/usr/bin/env bash
# Idempotent set-up shared by the two README commands: Debian packages, a virtual environment
# with the locked dependencies (requirements.lock), and the project installed in editable mode. A
# stamp keyed by the hash of pyproject.toml and the lock makes a re-run skip the install when
# nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SERFORGET_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v git >/dev/null 2>&1 || need_apt+=(git)
"$PYTHON_BIN" -c "import venv, ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  echo "[setup] installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.serforget-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing locked dependencies (first run downloads torch: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.lock"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
else
  echo "[setup] environment up to date ($VENV)"
fi
