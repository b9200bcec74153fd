#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with the pinned CPU constraints.
# Idempotent: a stamp file records the hash of the inputs, so a second run costs a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "error: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
WANT="$(cat pyproject.toml requirements/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch first, from the pinned CPU-machine versions; then the project and its extras under the same constraints.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c requirements/constraints-cpu.txt torch torchvision
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c requirements/constraints-cpu.txt -e ".[data,logging,test]"
echo "$WANT" > "$STAMP"
