#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with the pinned CPU constraints.
#   --libero   also create ./.venv-libero, the LIBERO simulator's own environment (requirements/libero.txt),
#              used by experiments/robot/libero/run_libero_eval.py for its simulator workers.
# Idempotent: a stamp file per environment records the hash of its inputs, so a second run costs a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WITH_LIBERO=0
for arg in "$@"; do
  case "$arg" in
    --libero) WITH_LIBERO=1 ;;
    *) echo "setup_env.sh: unknown argument $arg (known: --libero)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "error: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
PIP_FLAGS=(--quiet --disable-pip-version-check)

VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
WANT="$(cat pyproject.toml requirements/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup_env: installing the pinned training set into .venv (torch, tensorflow, ...: several GB, a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip
  # torch first, from the pinned CPU-machine versions; then the project and its extras under the same constraints.
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -c requirements/constraints-cpu.txt torch torchvision
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" -c requirements/constraints-cpu.txt -e ".[data,logging,test,eval]"
  echo "$WANT" > "$STAMP"
  echo "setup_env: .venv ready"
fi

if [ "$WITH_LIBERO" = 1 ]; then
  LVENV="$ROOT/.venv-libero"
  LSTAMP="$LVENV/.installed"
  LWANT="$(sha256sum requirements/libero.txt | cut -c1-16)"
  if [ ! -f "$LSTAMP" ] || [ "$(cat "$LSTAMP")" != "$LWANT" ]; then
    echo "setup_env: installing the pinned LIBERO simulator into .venv-libero (robosuite 1.4.1, mujoco 3.3.2, assets: ~2.2 GB, 1-3 minutes)"
    [ -x "$LVENV/bin/python" ] || "$PY" -m venv "$LVENV"
    "$LVENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip
    # Every package is pinned in the file, so --no-deps installs exactly that set (see its header).
    "$LVENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -r requirements/libero.txt
    MUJOCO_GL=egl "$LVENV/bin/python" -c "import libero.libero.envs, robosuite, mujoco" 2>/dev/null \
      || { echo "error: .venv-libero cannot import LIBERO (see above)" >&2; exit 1; }
    echo "$LWANT" > "$LSTAMP"
    echo "setup_env: .venv-libero ready"
  fi
fi
